"""The converted folder is right for every consumer, not only for the transformers we run on.

Other readers get their own interpreter: transformers 4.57 (the last 4.x) from a virtualenv named by
PHI_RULES_TF4_PYTHON, and llama.cpp's own convert_hf_to_gguf.py from the folder named by
PHI_RULES_LLAMA_CPP (the llama-cpp-python source distribution carries it with its gguf-py).
`.ci/run` prepares both. Where no variable names them, the tests look for them where they are installed: an
interpreter on PATH whose transformers is 4.57 or later 4.x, and convert_hf_to_gguf.py on PATH with its
gguf-py beside it. They skip only where neither is found, and under CI that is a failure.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT
from make_tiny_example import TINY
from phi_reference import IDS, MsftConfig, random_state, reference_logits, write_checkpoint
from safetensors.torch import load_file

PHI2 = ROOT / "rules" / "phi-2.yaml"
TINY_RULE = ROOT / "rules" / "examples" / "tiny-phi-2.yaml"
PHI2_SHAPED = MsftConfig(vocab_size=80, n_embd=160, n_layer=2, n_head=2, rotary_dim=32)  # head_dim 80: factor 0.4


@functools.cache
def _transformers_4() -> Path | None:
    """An interpreter on PATH whose transformers (with torch) is 4.57 or a later 4.x."""
    seen: set[Path] = set()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        for python in sorted(Path(folder).glob("python*")) if Path(folder).is_dir() else []:
            real = python.resolve()
            if not re.fullmatch(r"python(3(\.\d+)?)?", python.name) or real in seen or not os.access(real, os.X_OK):
                continue
            seen.add(real)
            ask = "import torch, transformers; print(transformers.__version__)"
            try:
                run = subprocess.run([str(python), "-c", ask], capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                continue
            version = re.match(r"4\.(\d+)", run.stdout.strip()) if run.returncode == 0 else None
            if version and int(version.group(1)) >= 57:
                return python
    return None


def _llama_cpp() -> Path | None:
    """llama.cpp's folder: convert_hf_to_gguf.py on PATH, with its gguf-py beside it."""
    script = shutil.which("convert_hf_to_gguf.py")
    folder = Path(script).resolve().parent if script else None
    return folder if folder is not None and (folder / "gguf-py").is_dir() else None


INSTALLED = {"PHI_RULES_TF4_PYTHON": _transformers_4, "PHI_RULES_LLAMA_CPP": _llama_cpp}


def _tool(variable: str, what: str) -> Path:
    value = os.environ.get(variable)
    if value:
        return Path(value)
    found = INSTALLED[variable]()
    if found is not None:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"{variable} is not set: .ci/run prepares {what}")
    pytest.skip(f"set {variable} to run this ({what}; see .ci/run)")


TF4_PROGRAM = """
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
folder, ids = sys.argv[1], json.loads(sys.argv[2])
config = AutoConfig.from_pretrained(folder)
model, info = AutoModelForCausalLM.from_pretrained(
    folder, output_loading_info=True, torch_dtype=torch.float32, attn_implementation="eager"
)
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
print(json.dumps({"config": config.to_dict(), "info": {k: list(v) for k, v in info.items()},
                  "logits": logits.tolist()}))
"""


def test_transformers_4_computes_the_original_function(cli, tmp_path: Path) -> None:
    python = _tool("PHI_RULES_TF4_PYTHON", "a virtualenv with transformers==4.57.6")
    state = random_state(PHI2_SHAPED, seed=11)
    src = write_checkpoint(tmp_path / "src", state, PHI2_SHAPED, shards=2)
    out = tmp_path / "out"
    code, _, err = cli("apply", PHI2, "--source", src, "--out", out, "--quiet")
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert saved["partial_rotary_factor"] == pytest.approx(0.4) and saved["rope_theta"] == 10000.0

    result = tf4_forward(python, out, IDS.tolist())
    # Every value the rule asked for is what 4.x reads, under its own attribute names.
    plan = cli("plan", PHI2, "--source", src, "--json")[1]
    for key, value in json.loads(plan)["config"].items():
        assert result["config"][key] == pytest.approx(value), key
    got = torch.tensor(result["logits"])
    diff = (got - reference_logits(state, PHI2_SHAPED, IDS)).abs().max().item()
    assert diff <= 1e-4, diff


def tf4_forward(python: Path, folder: Path, ids: list[int]) -> dict[str, Any]:
    """transformers 4.57, in its own virtualenv, loading ``folder``: its config, loading info and logits."""
    run = subprocess.run(
        [str(python), "-c", TF4_PROGRAM, str(folder), json.dumps(ids)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
    )
    assert run.returncode == 0, run.stderr
    result: dict[str, Any] = json.loads(run.stdout)
    assert all(not v for v in result["info"].values()), result["info"]  # strict: nothing missing or unexpected
    return result


# transformers names -> llama.cpp's GGUF names for the Phi2 architecture (gguf-py's tensor table).
GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.final_layernorm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.dense": "attn_output",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}


def _gguf_name(name: str) -> str:
    module, param = name.rsplit(".", 1)
    if module.startswith("model.layers."):
        layer, rest = module.removeprefix("model.layers.").split(".", 1)
        return f"blk.{layer}.{GGUF_NAMES[rest]}.{param}"
    return f"{GGUF_NAMES[module]}.{param}"


def gguf_of(llama: Path, folder: Path, gguf_file: Path) -> Any:
    """llama.cpp's own converter run on an output folder (float32), and gguf-py's reader of the result."""
    convert = [str(llama / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(gguf_file), "--outtype", "f32"]
    run = subprocess.run(
        [sys.executable, *convert],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(llama / "gguf-py")},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    sys.path.insert(0, str(llama / "gguf-py"))
    try:
        import gguf
    finally:
        sys.path.remove(str(llama / "gguf-py"))
    return gguf.GGUFReader(gguf_file)


def test_llama_cpp_converts_the_output_to_gguf(cli, tmp_path: Path) -> None:
    llama = _tool("PHI_RULES_LLAMA_CPP", "llama.cpp's convert_hf_to_gguf.py and gguf-py")
    out = tmp_path / "out"
    code, _, err = cli("apply", TINY_RULE, "--out", out, "--quiet")
    assert code == 0, err
    reader = gguf_of(llama, out, tmp_path / "tiny.gguf")
    assert reader.fields["general.architecture"].contents() == "phi2"
    assert reader.fields["phi2.rope.dimension_count"].contents() == TINY.rotary_dim
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    ours = load_file(out / "model.safetensors")
    theirs = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert set(theirs) == {_gguf_name(n) for n in ours}
    for name, tensor in ours.items():
        assert torch.equal(theirs[_gguf_name(name)], tensor.float()), name


def test_tiny_example_output_works_in_a_pipeline(cli, tmp_path: Path) -> None:
    from transformers import pipeline

    out = tmp_path / "out"
    code, _, err = cli("apply", TINY_RULE, "--out", out)
    assert code == 0, err
    assert "warning" not in err
    generate = pipeline("text-generation", model=str(out))
    ids = generate.tokenizer("Hello world, this is phi")["input_ids"]
    assert ids == [15496, 995, 11, 428, 318, 872, 72]  # GPT-2's own token ids for this text
    text = generate("Hello world", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("Hello world") and len(text) > len("Hello world")


def _source_without_tokenizer(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "src", random_state(PHI2_SHAPED, seed=1), PHI2_SHAPED)


def test_output_without_tokenizer_is_a_warning_naming_what_breaks(cli, tmp_path: Path) -> None:
    src = _source_without_tokenizer(tmp_path)
    code, _, err = cli("apply", PHI2, "--source", src, "--out", tmp_path / "out")
    assert code == 0, err
    assert f"note: not in {src}, not copied: tokenizer.json, tokenizer_config.json, vocab.json, merges.txt" in err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "no tokenizer files" in warning[0] and "--tokenizer" in warning[0]
    assert "vLLM" in warning[0] and "llama.cpp" in warning[0]


def test_require_tokenizer_refuses_and_writes_nothing(cli, tmp_path: Path) -> None:
    src = _source_without_tokenizer(tmp_path)
    out = tmp_path / "out"
    code, _, err = cli("apply", PHI2, "--source", src, "--out", out, "--require-tokenizer", "--quiet")
    assert code == 1 and err.startswith(f"error: {out}: not written: the output has no tokenizer files")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_tokenizer_from_another_folder(cli, tmp_path: Path) -> None:
    src = _source_without_tokenizer(tmp_path)
    out = tmp_path / "out"
    tokenizer = ROOT / "rules" / "examples" / "tiny-phi-2"
    code, _, err = cli("apply", PHI2, "--source", src, "--out", out, "--tokenizer", tokenizer, "--require-tokenizer")
    assert code == 0, err
    assert f"note: tokenizer files from {tokenizer}: tokenizer_config.json, vocab.json, merges.txt" in err
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tokenizer / name).read_bytes()


def test_tokenizer_argument_that_is_neither_folder_nor_repo(cli, tmp_path: Path) -> None:
    src = _source_without_tokenizer(tmp_path)
    code, _, err = cli("apply", PHI2, "--source", src, "--out", tmp_path / "o", "--tokenizer", "no such thing")
    assert code == 1
    assert err.strip() == "error: --tokenizer no such thing: neither a folder nor a hub repository owner/name@revision"
