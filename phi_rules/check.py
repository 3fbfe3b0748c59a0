"""Whole-folder checks: what sits beside the weights (config.json, generation_config.json, the tokenizer and its
chat template) agrees with the weights and with itself.

The silent failures of converted models are mostly here, not in the tensors: an eos list cut to config.json's
one id (the model talks past every answer), a longrope factor list of the wrong length or a reset
``original_max_position_embeddings`` (garbage after a few thousand tokens), a tokenizer with more ids than the
embedding has rows. Each check reads files as JSON (and safetensors headers); no torch. ``phi-rules check``
runs them on any folder, ``apply`` on its output before publishing it (a finding the source itself has is a
warning there, one the conversion brought is a refusal).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi_rules.errors import PhiRulesError
from phi_rules.source.header import read_safetensors

Files = Mapping[str, Path]  # a model folder: each file by its name
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
_MARK = "PHIRULESTURNENDSHERE"  # an assistant message's content, to find what the template writes after it
_MARKUP = re.compile(r"<\|?[\w.-]+\|?>|</s>")  # what a turn-ending token looks like: <|end|>, <|im_end|>, </s>


@dataclass(frozen=True)
class Finding:
    """One thing a folder gets wrong; ``wrong``: the model would compute or generate wrongly with it."""

    code: str
    file: str
    message: str
    wrong: bool = True

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "file": self.file, "message": self.message, "wrong": self.wrong}


def folder_files(folder: Path) -> dict[str, Path]:
    """A folder's plain files by name; one line when it is no folder."""
    if not folder.is_dir():
        raise PhiRulesError(f"{folder}: not a folder")
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}


def _json(files: Files, name: str) -> Any:
    """A JSON file of the folder, or None when it is absent or unreadable (the readers below say nothing then:
    a file that transformers cannot read fails loudly on its own)."""
    path = files.get(name)
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _object(files: Files, name: str) -> dict[str, Any]:
    got = _json(files, name)
    return got if isinstance(got, dict) else {}


def _ids(value: Any) -> list[int]:
    """A token-id field as a list: an int, a list of ints, or nothing."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool)] if isinstance(value, list) else []


# --- what a folder says ------------------------------------------------------------------------------
def token_ids(files: Files) -> dict[str, int]:
    """Every token the tokenizer files name, by its text: the vocabulary and the added tokens."""
    found: dict[str, int] = {}
    tokenizer = _object(files, "tokenizer.json")
    model = tokenizer.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        found |= {k: v for k, v in vocab.items() if isinstance(v, int)}
    elif isinstance(vocab, list):  # Unigram: [piece, score] pairs, the id is the position
        found |= {str(p[0]): i for i, p in enumerate(vocab) if isinstance(p, list) and p}
    found |= {k: v for k, v in _object(files, "vocab.json").items() if isinstance(v, int)}
    found |= {k: v for k, v in _object(files, "added_tokens.json").items() if isinstance(v, int)}
    decoder = _object(files, "tokenizer_config.json").get("added_tokens_decoder")
    if isinstance(decoder, dict):
        found |= {t["content"]: int(i) for i, t in decoder.items() if isinstance(t, dict) and str(i).isdigit()}
    added = tokenizer.get("added_tokens")
    if isinstance(added, list):
        found |= {t["content"]: t["id"] for t in added if isinstance(t, dict) and isinstance(t.get("id"), int)}
    return found


def _special_tokens(files: Files) -> set[str]:
    """The tokens a chat template can write as one id: the added ones."""
    names = set(_object(files, "added_tokens.json"))
    added = _object(files, "tokenizer.json").get("added_tokens")
    if isinstance(added, list):
        names |= {t["content"] for t in added if isinstance(t, dict) and isinstance(t.get("content"), str)}
    decoder = _object(files, "tokenizer_config.json").get("added_tokens_decoder")
    if isinstance(decoder, dict):
        names |= {t["content"] for t in decoder.values() if isinstance(t, dict) and isinstance(t.get("content"), str)}
    return names


def tokenizer_size(files: Files) -> int | None:
    """How many ids the tokenizer can produce (its largest id + 1), or None without tokenizer files."""
    ids = token_ids(files)
    if ids:
        return max(ids.values()) + 1
    if "tokenizer.model" in files:
        try:
            import sentencepiece

            return int(sentencepiece.SentencePieceProcessor(model_file=str(files["tokenizer.model"])).get_piece_size())
        except Exception:  # not installed, or not a SentencePiece model: nothing to say then
            return None
    return None


def chat_template(files: Files) -> str | None:
    """The chat template: chat_template.jinja (transformers 5 writes it), else tokenizer_config.json's."""
    path = files.get("chat_template.jinja")
    if path is not None:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
    template = _object(files, "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _render(template: str, files: Files) -> str | None:
    """The template rendered for a user turn and an assistant turn, in jinja2's sandbox as transformers does."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        config = _object(files, "tokenizer_config.json")
        tokens = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
        messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _MARK}]
        return env.from_string(template).render(messages=messages, add_generation_prompt=False, **tokens)
    except Exception:  # jinja2 absent, or a template that needs what this render does not give
        return None


def end_of_turn(files: Files) -> tuple[str, int] | None:
    """The token the chat template ends an assistant turn with (Phi-3's ``<|end|>``, Phi-4's ``<|im_end|>``)
    and its id, where the folder's template and tokenizer say."""
    template = chat_template(files)
    rendered = _render(template, files) if template else None
    if rendered is None or _MARK not in rendered:
        return None
    after = rendered.split(_MARK, 1)[1].lstrip()
    special = sorted((t for t in _special_tokens(files) if t and after.startswith(t)), key=len, reverse=True)
    marked = _MARKUP.match(after)  # a tokenizer that keeps its markup tokens in the vocabulary, not as added ones
    ids = token_ids(files)
    token = special[0] if special else marked.group(0) if marked else None
    return (token, ids[token]) if token in ids else None


def eos_list(files: Files) -> tuple[str, list[int]] | None:
    """The ids generation stops on, and the file that says so: generation_config.json, else config.json."""
    for name in ("generation_config.json", "config.json"):
        ids = _ids(_object(files, name).get("eos_token_id"))
        if ids:
            return name, ids
    return None


def _rope(config: Mapping[str, Any]) -> dict[str, Any]:
    """The rope settings in one object, whichever form wrote them (5's rope_parameters, 4.x's rope_scaling)."""
    rope: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):  # the later form wins
        value = config.get(key)
        if isinstance(value, dict):
            rope |= {k: v for k, v in value.items() if v is not None}
    kind = rope.get("rope_type", rope.get("type", "default"))
    rope["rope_type"] = "longrope" if kind == "su" else kind
    return rope


UNSCALED = ("default", "linear")  # rope types that read no original_max_position_embeddings


def original_positions(config: Mapping[str, Any]) -> Any:
    """original_max_position_embeddings wherever the config keeps it (None: nowhere)."""
    rope = _rope(config)
    return rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))


def max_positions(config: Mapping[str, Any]) -> Any:
    return config.get("max_position_embeddings", config.get("n_positions"))


# --- the checks on one folder -------------------------------------------------------------------------
def findings(files: Files, config: Mapping[str, Any] | None = None) -> list[Finding]:
    """Every finding on one folder; ``config``: its config.json as a rule reads it, instead of the file."""
    config = _object(files, "config.json") if config is None else config
    return [
        *_ids_in_vocab(files, config),
        *_end_of_turn_stops(files),
        *_factor_lengths(config),
        *_positions(config),
        *_head_dim(files, config),
        *_tokenizer_fits(files, config),
    ]


def _ids_in_vocab(files: Files, config: Mapping[str, Any]) -> Iterator[Finding]:
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int):
        return
    for name in ("config.json", "generation_config.json"):
        fields = _object(files, name) if name != "config.json" else config
        for key in _TOKEN_KEYS:
            for i in _ids(fields.get(key)):
                if not 0 <= i < vocab:
                    yield Finding(
                        "token-id-outside-vocab",
                        name,
                        f"{key} {i} is outside vocab_size {vocab}: the embedding has no row for it "
                        "(an index error on GPU, a wrong token elsewhere)",
                    )


def _end_of_turn_stops(files: Files) -> Iterator[Finding]:
    end, stops = end_of_turn(files), eos_list(files)
    if end is None or stops is None or end[1] in stops[1]:
        return
    yield Finding(
        "eos-misses-end-of-turn",
        stops[0],
        f"eos_token_id {stops[1]} lacks {end[1]} ({end[0]}), the token the chat template ends each turn with: "
        "generation runs past the end of every answer",
    )


def rotary_dims(config: Mapping[str, Any]) -> int | None:
    """The dimensions of each head that rotate: head_dim (explicit, or hidden_size / heads) times the fraction."""
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    derived = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None
    head_dim = config.get("head_dim") or derived
    fraction = _rope(config).get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if not isinstance(head_dim, int) or not isinstance(fraction, (int, float)):
        return None
    return int(head_dim * fraction)


def _factor_lengths(config: Mapping[str, Any]) -> Iterator[Finding]:
    rope, dims = _rope(config), rotary_dims(config)
    if rope["rope_type"] != "longrope" or dims is None:
        return
    for key in ("short_factor", "long_factor"):
        factors = rope.get(key)
        if isinstance(factors, list) and len(factors) != dims // 2:
            yield Finding(
                "rope-factor-length",
                "config.json",
                f"longrope {key} has {len(factors)} entries where the {dims} rotary dimensions need {dims // 2}: "
                "the rotary frequencies are wrong at every position",
            )


def _positions(config: Mapping[str, Any]) -> Iterator[Finding]:
    if _rope(config)["rope_type"] != "longrope":
        return
    original, limit = original_positions(config), max_positions(config)
    top = config.get("original_max_position_embeddings")
    if original is None:
        yield Finding(
            "original-positions",
            "config.json",
            "longrope without original_max_position_embeddings: readers fall back to 4096 (transformers' Phi3) or "
            "to max_position_embeddings (Llama), and switch to the long factors at another length",
        )
    elif isinstance(limit, int) and isinstance(original, int) and original >= limit:
        yield Finding(
            "original-positions",
            "config.json",
            f"longrope with original_max_position_embeddings {original} >= max_position_embeddings {limit}: the "
            "long factors and their scaling are never used (one of the two was reset)",
        )
    elif top is not None and top != original:
        yield Finding(
            "original-positions",
            "config.json",
            f"original_max_position_embeddings is {top} at the top level but {original} in the rope settings: "
            "readers of each form compute different positions",
        )


def _headers(files: Files) -> dict[str, list[int]]:
    """Every tensor's shape in the folder's safetensors files, by name (headers only)."""
    shapes: dict[str, list[int]] = {}
    for name, path in files.items():
        if name.endswith(".safetensors"):
            try:
                shapes |= {k: list(t.shape) for k, t in read_safetensors(path).items()}
            except (PhiRulesError, OSError):
                continue  # an unreadable weights file fails loudly when it is loaded
    return shapes


def _head_dim(files: Files, config: Mapping[str, Any]) -> Iterator[Finding]:
    head_dim, heads = config.get("head_dim"), config.get("num_attention_heads")
    if not isinstance(head_dim, int) or not isinstance(heads, int):
        return
    kv = config.get("num_key_value_heads") or heads
    rows = {"q_proj": heads * head_dim, "k_proj": kv * head_dim, "qkv_proj": (heads + 2 * kv) * head_dim}
    for name, shape in sorted(_headers(files).items()):
        m = re.search(r"layers\.0\.self_attn\.(q_proj|k_proj|qkv_proj)\.weight$", name)
        if m and shape and shape[0] != rows[m.group(1)]:
            yield Finding(
                "head-dim",
                "config.json",
                f"head_dim {head_dim} but {name} has {shape[0]} rows, not {rows[m.group(1)]}: the split did not use "
                "the config's head_dim, and the model reshapes every head wrongly",
            )


def _tokenizer_fits(files: Files, config: Mapping[str, Any]) -> Iterator[Finding]:
    vocab, size = config.get("vocab_size"), tokenizer_size(files)
    if isinstance(vocab, int) and size is not None and size > vocab:
        yield Finding(
            "tokenizer-larger-than-vocab",
            "config.json",
            f"the tokenizer has {size} ids but vocab_size is {vocab}: ids from {vocab} on have no embedding row",
        )


# --- a conversion's output against its source ------------------------------------------------------
def compared(source: Files, output: Files, overrides: Iterable[str] = ()) -> list[Finding]:
    """What the conversion lost or changed (``--set`` fields are the user's own changes)."""
    before, after = _object(source, "config.json"), _object(output, "config.json")
    if not before or not after:
        return []
    found = []
    pairs = [("max_position_embeddings", max_positions(before), max_positions(after))]
    if _rope(before)["rope_type"] not in UNSCALED:  # with no scaling, nothing reads the original length
        pairs.append(("original_max_position_embeddings", original_positions(before), original_positions(after)))
    for key, was, now in pairs:
        if was is not None and was != now and key not in overrides:
            found.append(
                Finding(
                    "positions-changed",
                    "config.json",
                    f"{key} is {now!r} where the source has {was!r}: the positions past the original length "
                    "compute differently",
                )
            )
    got, had = eos_list(output), eos_list(source)
    if had is not None and had[0] == "generation_config.json" and (got is None or set(had[1]) - set(got[1])):
        found.append(
            Finding(
                "eos-list-changed",
                "generation_config.json",
                f"eos_token_id is {got[1] if got else None} where the source's is {had[1]}: generation would not "
                "stop where the source's does",
            )
        )
    return found


def before_publishing(
    source: Files, output: Files, overrides: Mapping[str, Any], defaults: Mapping[str, Any]
) -> tuple[list[Finding], list[Finding]]:
    """(what refuses the output: findings the conversion brought, what to warn of: the source's own).

    ``defaults`` are the rule's config_defaults, what the source means where its config.json is silent (phi-2's
    eos 50256), and ``overrides`` what ``--set`` says: a finding they bring is the rule's or the user's reading
    of the source, not the conversion's doing, nor the source's own word: neither refused nor warned of."""
    own = findings(source)
    read = {**defaults, **_object(source, "config.json"), **overrides}
    had = {f.code for f in [*own, *findings(source, read)]}
    refused = [f for f in [*findings(output), *compared(source, output, overrides)] if f.wrong and f.code not in had]
    return refused, own
