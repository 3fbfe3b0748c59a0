"""A converted folder is whole (#29): generation config, tokenizer and chat template carried, and checked.

Sources are written by transformers (``save_pretrained`` of tiny Phi3 models, ``GenerationConfig``) with
tokenizers written by the ``tokenizers`` library and transformers (a BPE trained here, saved as tokenizer.json
and as vocab.json + merges.txt, with a Phi-3 or Phi-4 chat template). Round trips through ``--to llama`` /
``--to mistral`` and back keep every side file byte for byte on first runs and remembered ones alike; the
checks of ``phi-rules check`` fire on folders broken the way the reported failures were, and pass good ones.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast
from transformers.models.phi3 import configuration_phi3, modeling_phi3
from transformers.utils import logging as transformers_logging

transformers_logging.disable_progress_bar()

Cli = Callable[..., tuple[int, str, str]]
SPECIAL = ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
PHI4_SPECIAL = ["<unk>", "<s>", "<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"]
END = {"phi-3": ("<|end|>", 6), "phi-4": ("<|im_end|>", 5)}
TEMPLATES = {  # the shape of Phi-3's and Phi-4's own templates
    "phi-3": "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
    "phi-4": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] "
    "+ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}",
}
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "how should i explain the internet to a medieval knight",
    "phi models are small language models that reason well",
] * 20
BASE: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0 + 0.1 * i for i in range(8)],
    "long_factor": [2.0 + 0.3 * i for i in range(8)],
    "original_max_position_embeddings": 16,
}
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt")
MESSAGES = [{"role": "user", "content": "how should i explain the internet"}, {"role": "assistant", "content": "fox"}]


def write_tokenizer(folder: Path, family: str, extra_tokens: int = 0) -> None:
    """A BPE trained here by ``tokenizers``, saved by transformers (tokenizer.json, tokenizer_config.json,
    chat_template.jinja) and by the BPE model itself (vocab.json, merges.txt), with added_tokens.json as the
    hub repositories ship it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    special = SPECIAL if family == "phi-3" else PHI4_SPECIAL
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=96, special_tokens=special, show_progress=False))
    folder.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(folder))  # vocab.json and merges.txt
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<unk>"
    )
    fast.add_tokens([f"word{i}" for i in range(extra_tokens)])
    fast.chat_template = TEMPLATES[family]
    fast.save_pretrained(folder)
    added = {t: bpe.token_to_id(t) for t in special}
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2))
    if family == "phi-3":  # Phi-3 and Phi-3.5 ship their SentencePiece model beside tokenizer.json
        write_sentencepiece(folder / "tokenizer.model")


def write_sentencepiece(path: Path, size: int = 60) -> None:
    """A SentencePiece model trained here by the ``sentencepiece`` package."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=size, model_type="bpe", minloglevel=2
    )
    path.write_bytes(model.getvalue())


def phi3_source(folder: Path, family: str = "phi-4", rope: dict[str, Any] | None = None, **config: Any) -> Path:
    """An instruct-style Phi3 source: transformers' weights and config, a generation_config.json with an eos
    list and sampling defaults, and the tokenizer files."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shape = {"rope_parameters": rope or {"rope_type": "default", "rope_theta": 250000.0}}
        if rope and "original_max_position_embeddings" in rope:
            shape["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
        model = modeling_phi3.Phi3ForCausalLM(configuration_phi3.Phi3Config(**{**BASE, **shape, **config})).eval()
    model.save_pretrained(folder)
    eos = [2, END[family][1]]
    GenerationConfig(
        bos_token_id=1, eos_token_id=eos, pad_token_id=0, do_sample=True, temperature=0.7, top_p=0.9
    ).save_pretrained(folder)
    write_tokenizer(folder, family)
    return folder


def side_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "config.json" and "safetensors" not in p.name}


def rendered(folder: Path) -> str:
    text = AutoTokenizer.from_pretrained(folder).apply_chat_template(MESSAGES, tokenize=False)
    assert isinstance(text, str)
    return text


def convert(cli: Cli, src: Path, out: Path, target: str, *extra: object) -> str:
    code, _, err = cli("apply", "--source", src, "--to", target, "--out", out, "--quiet", *extra)
    assert code == 0, err
    return err


# --- carried -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "target"), [("phi-4", "llama"), ("phi-3", "mistral")])
def test_round_trip_carries_every_side_file(cli: Cli, tmp_path: Path, family: str, target: str) -> None:
    """There and back, twice (the second run's target check is remembered): generation_config.json, every
    tokenizer file and the chat template as the source has them, byte for byte; the runs write the same."""
    src = phi3_source(tmp_path / "src", family, sliding_window=12 if target == "mistral" else None)
    source = side_files(src)
    assert set(TOKENIZER) | {"generation_config.json", "added_tokens.json"} <= set(source)
    assert ("tokenizer.model" in source) == (family == "phi-3")
    for run in ("first", "remembered"):
        code, _, err = cli("apply", "--source", src, "--to", target, "--out", tmp_path / run / target)
        assert code == 0 and "no rule names it" not in err and "not copied" not in err, err  # every file named
        convert(cli, tmp_path / run / target, tmp_path / run / "back", "phi3")
        for folder in (tmp_path / run / target, tmp_path / run / "back"):
            assert side_files(folder) == source, folder
            assert rendered(folder) == rendered(src)
            assert GenerationConfig.from_pretrained(folder).eos_token_id == [2, END[family][1]]
            code, out, _ = cli("check", folder)
            assert code == 0 and out == "", out
    for name in ("back", target):  # a remembered check writes what a first run writes (the weights name the path)
        first, again = tmp_path / "first" / name, tmp_path / "remembered" / name
        assert (first / "config.json").read_bytes() == (again / "config.json").read_bytes()
        assert side_files(first) == side_files(again)
    generation = json.loads((tmp_path / "first" / "back" / "generation_config.json").read_text())
    assert generation["do_sample"] is True and generation["temperature"] == 0.7 and generation["top_p"] == 0.9


def test_a_source_without_generation_config_stops_at_the_end_of_a_turn(cli: Cli, tmp_path: Path) -> None:
    """Derived from config.json (eos 2), plus the id of the token the chat template ends a turn with; the same
    on a remembered run."""
    src = phi3_source(tmp_path / "src", "phi-3")
    (src / "generation_config.json").unlink()
    for run in ("first", "remembered"):
        err = convert(cli, src, tmp_path / run, "llama")
        assert "generation_config.json" not in err  # derived, not "not copied"
        assert GenerationConfig.from_pretrained(tmp_path / run).eos_token_id == [2, 6]
    assert (tmp_path / "first" / "generation_config.json").read_bytes() == (
        tmp_path / "remembered" / "generation_config.json"
    ).read_bytes()


def test_legacy_source_carries_its_files_and_notes_unnamed_ones(cli: Cli, tmp_path: Path) -> None:
    """phi-2's layout: its generation_config.json and GPT-2 BPE files byte for byte; a file no rule names (a
    README, remote code) is copied with one note each, never dropped in silence."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "rules" / "examples" / "tiny-phi-2", src)
    GenerationConfig(bos_token_id=50256, eos_token_id=50256, max_length=64).save_pretrained(src)
    (src / "README.md").write_text("# a fine-tune\n")
    (src / "modeling_phi.py").write_text("# remote code\n")
    code, _, err = cli("apply", "--source", src, "--out", tmp_path / "out")
    assert code == 0, err
    out = tmp_path / "out"
    for name in ("generation_config.json", "vocab.json", "merges.txt", "tokenizer_config.json", "README.md"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    notes = [line for line in err.splitlines() if "no rule names it" in line]
    assert len(notes) == 2 and "README.md" in notes[0] and "modeling_phi.py" in notes[1], err
    code, _, err = cli("apply", "--source", src, "--out", out, "--force", "--quiet")  # still an output of ours
    assert code == 0, err


# --- checked ---------------------------------------------------------------------------------------------
def edit(folder: Path, name: str, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((folder / name).read_text())
    change(data)
    (folder / name).write_text(json.dumps(data, indent=2))


def _cut_eos(c: dict[str, Any]) -> None:
    c["eos_token_id"] = 2


def _short_factors(c: dict[str, Any]) -> None:
    c["rope_parameters"]["long_factor"] = c["rope_parameters"]["long_factor"][:6]


def _reset_original(c: dict[str, Any]) -> None:
    c["rope_parameters"]["original_max_position_embeddings"] = c["original_max_position_embeddings"] = 64


def _drop_original(c: dict[str, Any]) -> None:
    del c["rope_parameters"]["original_max_position_embeddings"], c["original_max_position_embeddings"]


def _eos_outside(c: dict[str, Any]) -> None:
    c["eos_token_id"] = [2, 6, 500]


def _head_dim(c: dict[str, Any]) -> None:
    c["head_dim"] = 8


BROKEN = {
    "eos-cut-to-one-id": ("generation_config.json", _cut_eos, "eos-misses-end-of-turn"),
    "factor-list-of-the-wrong-length": ("config.json", _short_factors, "rope-factor-length"),
    "original-positions-reset": ("config.json", _reset_original, "original-positions"),
    "original-positions-dropped": ("config.json", _drop_original, "original-positions"),
    "eos-outside-vocab": ("generation_config.json", _eos_outside, "token-id-outside-vocab"),
    "head-dim-the-split-did-not-use": ("config.json", _head_dim, "head-dim"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Phi-3-mini-128k-shaped instruct folder (longrope, Phi-3's template), as transformers writes it."""
    return phi3_source(tmp_path_factory.mktemp("good") / "src", "phi-3", rope=dict(LONGROPE))


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_check_flags_each_broken_folder(cli: Cli, tmp_path: Path, good: Path, broken: str) -> None:
    name, change, code_name = BROKEN[broken]
    folder = tmp_path / broken
    shutil.copytree(good, folder)
    edit(folder, name, change)
    code, out, _ = cli("check", folder)
    assert code == 1 and len(out.splitlines()) >= 1, out
    assert all(line.startswith("error: ") for line in out.splitlines()), out
    code, out, _ = cli("check", folder, "--json")
    found = json.loads(out)["findings"]
    assert code == 1 and code_name in {f["code"] for f in found}, found


def test_check_flags_a_tokenizer_larger_than_vocab_size(cli: Cli, tmp_path: Path, good: Path) -> None:
    folder = tmp_path / "big"
    shutil.copytree(good, folder)
    write_tokenizer(folder, "phi-3", extra_tokens=40)  # 96 + 40 ids for 128 embedding rows
    code, out, _ = cli("check", folder)
    assert code == 1 and "the tokenizer has 136 ids but vocab_size is 128" in out, out


def test_check_reads_the_template_where_the_hub_phi3_keeps_it(cli: Cli, tmp_path: Path, good: Path) -> None:
    """Phi-3's hub repository has its chat template in tokenizer_config.json, and no chat_template.jinja."""
    folder = tmp_path / "hub-form"
    shutil.copytree(good, folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    edit(folder, "tokenizer_config.json", lambda c: c.update(chat_template=template))
    assert cli("check", folder)[0] == 0
    edit(folder, "generation_config.json", _cut_eos)
    code, out, _ = cli("check", folder)
    assert code == 1 and "lacks 6 (<|end|>)" in out, out


def test_check_finds_an_end_of_turn_token_kept_in_the_vocabulary(cli: Cli, tmp_path: Path, good: Path) -> None:
    """A tokenizer whose <|end|> is a plain vocabulary entry, not an added token: still the turn's end."""
    folder = tmp_path / "plain"
    shutil.copytree(good, folder)
    for name in ("added_tokens.json", "tokenizer_config.json", "tokenizer.model"):
        (folder / name).unlink()
    edit(folder, "tokenizer.json", lambda t: t.update(added_tokens=[]))
    edit(folder, "generation_config.json", _cut_eos)
    code, out, _ = cli("check", folder)
    assert code == 1 and "lacks 6 (<|end|>)" in out, out


def test_check_sizes_a_sentencepiece_tokenizer(cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "sp"
    folder.mkdir()
    write_sentencepiece(folder / "tokenizer.model", size=60)
    (folder / "config.json").write_text(json.dumps({"vocab_size": 50}))
    code, out, _ = cli("check", folder)
    assert code == 1 and "the tokenizer has 60 ids but vocab_size is 50" in out, out
    (folder / "config.json").write_text(json.dumps({"vocab_size": 64}))  # padded, as Phi-3's 32064
    assert cli("check", folder)[:2] == (0, "")


def test_check_passes_good_folders(cli: Cli, tmp_path: Path, good: Path) -> None:
    convert(cli, good, tmp_path / "llama", "llama")
    for folder in (good, tmp_path / "llama", ROOT / "rules" / "examples" / "tiny-phi-2"):
        code, out, _ = cli("check", folder, "--json")
        assert code == 0 and json.loads(out)["findings"] == [], out


def test_apply_warns_of_what_the_source_itself_has(cli: Cli, tmp_path: Path, good: Path) -> None:
    """A source that is that way already: the conversion goes on, saying so in one line."""
    src = tmp_path / "src"
    shutil.copytree(good, src)
    edit(src, "generation_config.json", _cut_eos)
    code, _, err = cli("apply", "--source", src, "--to", "llama", "--out", tmp_path / "out", "--quiet")
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warned) == 1 and "the source itself" in warned[0] and "lacks 6 (<|end|>)" in warned[0]


def test_apply_refuses_an_output_the_conversion_breaks(cli: Cli, tmp_path: Path, good: Path) -> None:
    """A rule that resets original_max_position_embeddings to max_position_embeddings (as exporters have): the
    long factors would never be used. One line, nothing written."""
    variant = tmp_path / "resets-positions.yaml"
    variant.write_text(
        f"version: 1\nname: resets-positions\nextends: {ROOT / 'rules' / 'phi3' / 'llama.yaml'}\ntarget:\n"
        "  config:\n    rope_parameters: >-\n      object('rope_type', 'longrope', 'rope_theta', 10000.0,"
        " 'short_factor', get(rope_parameters, 'short_factor'), 'long_factor', get(rope_parameters, 'long_factor'),"
        " 'original_max_position_embeddings', max_position_embeddings)\n"
    )
    out = tmp_path / "out"
    code, _, err = cli("apply", variant, "--source", good, "--out", out)
    assert code == 1 and not out.exists() and not list(tmp_path.glob(".out*")), err
    (line,) = err.strip().splitlines()[-1:]
    assert "not written" in line and "long factors" in line and "where the source has 16" in line, err
    assert not [x for x in err.splitlines() if x.startswith("error") and x != line], err


def test_an_output_is_compared_with_its_source(tmp_path: Path, good: Path) -> None:
    """What apply refuses besides the one-folder checks: stop ids of the source lost, position limits changed
    (unless --set changed them: the user's own word)."""
    from phi_rules.check import compared, folder_files

    out = tmp_path / "out"
    shutil.copytree(good, out)
    assert compared(folder_files(good), folder_files(out)) == []
    edit(out, "generation_config.json", lambda c: c.update(eos_token_id=[6]))
    edit(out, "config.json", lambda c: c.update(max_position_embeddings=32))
    found = compared(folder_files(good), folder_files(out))
    assert [f.code for f in found] == ["positions-changed", "eos-list-changed"], found
    assert "eos_token_id is [6] where the source's is [2, 6]" in str(found[1])
    assert [f.code for f in compared(folder_files(good), folder_files(out), {"max_position_embeddings": 32})] == [
        "eos-list-changed"
    ]


def test_check_is_one_line_for_a_folder_that_is_no_model(cli: Cli, tmp_path: Path) -> None:
    code, _, err = cli("check", tmp_path / "nothing")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "not a folder" in err, err
    (tmp_path / "empty").mkdir()
    code, _, err = cli("check", tmp_path / "empty")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "no config.json" in err, err
    (tmp_path / "empty" / "config.json").write_text("{not json")
    code, _, err = cli("check", tmp_path / "empty")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "cannot read it as JSON" in err, err
