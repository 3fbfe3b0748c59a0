"""Proof by function: random original checkpoints, converted by the CLI, loaded by transformers,
compared logit for logit with the original architecture implemented in phi_reference."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from phi_reference import MsftConfig, assert_same_function, random_state, to_mixformer, write_checkpoint
from safetensors import safe_open

import phi_rules

PHI2 = ROOT / "rules" / "phi-2.yaml"
HEAD64 = MsftConfig(vocab_size=80, n_embd=128, n_layer=2, n_head=2, rotary_dim=32)  # head_dim 64
HEAD80 = MsftConfig(vocab_size=80, n_embd=160, n_layer=2, n_head=2, rotary_dim=32, n_inner=200)  # head_dim 80
GQA = MsftConfig(vocab_size=80, n_embd=128, n_layer=2, n_head=4, n_head_kv=2, rotary_dim=16)  # 2 KV heads of 32


CASES = [
    ("bin-inv_freq-fp32-head64", HEAD64, torch.float32, "bin", 1, True),
    ("safetensors-fp16-head80", HEAD80, torch.float16, "safetensors", 1, False),
    ("sharded-bf16-head64", HEAD64, torch.bfloat16, "safetensors", 3, False),
    ("sharded-fp32-head80", HEAD80, torch.float32, "safetensors", 2, False),
    ("bin-inv_freq-fp16-head80", HEAD80, torch.float16, "bin", 1, True),
    ("grouped-query-fp32", GQA, torch.float32, "safetensors", 1, False),
]


@pytest.mark.parametrize(
    ("cfg", "dtype", "fmt", "shards", "inv_freq"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_logits_match_original(
    cli, tmp_path: Path, cfg: MsftConfig, dtype: torch.dtype, fmt: str, shards: int, inv_freq: bool
) -> None:
    state = random_state(cfg, dtype, inv_freq=inv_freq, seed=7)
    src = write_checkpoint(tmp_path / "src", state, cfg, fmt, shards)
    code, _, err = cli("apply", PHI2, "--source", src, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    assert_same_function(tmp_path / "out", state, cfg)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as fh:
        code = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {code}  # noqa: SIM118 - not a dict
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["rope_parameters"]["partial_rotary_factor"] == pytest.approx(cfg.rotary_dim / cfg.head_dim)
    assert saved["intermediate_size"] == (cfg.n_inner or 4 * cfg.n_embd)
    assert (tmp_path / "out" / "generation_config.json").is_file()


def test_dtype_cast_and_small_shards(cli, tmp_path: Path) -> None:
    state = random_state(HEAD64, torch.float16, seed=3)
    src = write_checkpoint(tmp_path / "src", state, HEAD64)
    out = tmp_path / "out"
    code, _, err = cli(
        "apply", PHI2, "--source", src, "--out", out, "--dtype", "float32", "--max-shard-size", "60KB", "--fsync"
    )
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    for s in shards:
        with safe_open(s, "pt") as fh:
            assert all(fh.get_tensor(k).dtype == torch.float32 for k in fh.keys())  # noqa: SIM118
    assert_same_function(out, state, HEAD64)


def test_mixformer_sequential_layout(cli, tmp_path: Path) -> None:
    state = random_state(HEAD64, torch.float32, inv_freq=True, seed=5)
    src = write_checkpoint(tmp_path / "src", to_mixformer(state, HEAD64.n_layer), HEAD64, "bin")
    code, _, err = cli("apply", ROOT / "rules" / "phi-1_5-mixformer.yaml", "--source", src, "--out", tmp_path / "out")
    assert code == 0, err
    assert_same_function(tmp_path / "out", state, HEAD64)


def test_tiny_example_is_shipped_and_converts_offline(cli, tmp_path: Path) -> None:
    from make_tiny_example import TINY, build

    build(tmp_path / "regenerated")
    shipped = ROOT / "rules" / "examples" / "tiny-phi-2"
    for f in (tmp_path / "regenerated").iterdir():
        assert f.read_bytes() == (shipped / f.name).read_bytes(), f.name
    assert sum(f.stat().st_size for f in shipped.iterdir()) < 6 * 1024 * 1024
    code, _, err = cli("apply", ROOT / "rules" / "examples" / "tiny-phi-2.yaml", "--out", tmp_path / "out")
    assert code == 0, err
    state = random_state(TINY, torch.float16, seed=2024)
    assert_same_function(tmp_path / "out", state, TINY)


def test_output_metadata_records_rule_and_sources(cli, tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", random_state(HEAD64, seed=1), HEAD64, shards=2)
    out = tmp_path / "out"
    assert cli("apply", PHI2, "--source", src, "--out", out)[0] == 0
    with safe_open(out / "model.safetensors", "pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "pt" and meta["phi_rules.rule"] == "phi-2"
    base = ROOT / "rules" / "layouts" / "phi-msft.yaml"  # the rule and the base it extends
    assert meta["phi_rules.rule_sha256"] == hashlib.sha256(PHI2.read_bytes() + base.read_bytes()).hexdigest()
    expected = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in src.glob("*.safetensors")}
    assert json.loads(meta["phi_rules.source_sha256"]) == expected


def test_bin_output_format(cli, tmp_path: Path) -> None:
    state = random_state(HEAD80, seed=2)
    src = write_checkpoint(tmp_path / "src", state, HEAD80)
    assert cli("apply", PHI2, "--source", src, "--out", tmp_path / "out", "--format", "bin")[0] == 0
    assert not list((tmp_path / "out").glob("*.safetensors"))
    assert_same_function(tmp_path / "out", state, HEAD80)


def test_python_api(tmp_path: Path) -> None:
    state = random_state(HEAD64, seed=4)
    src = write_checkpoint(tmp_path / "src", state, HEAD64)
    rules = phi_rules.load_rules(PHI2)
    options = phi_rules.Options(source=phi_rules.SourceOptions(source=src))
    plan = phi_rules.plan(rules, options)
    assert plan.config["hidden_size"] == 128 and len(plan.tensors) == 1 + 14 * HEAD64.n_layer + 4
    done = phi_rules.convert(rules, tmp_path / "out", options)
    assert [t.name for t in done.tensors] == [t.name for t in plan.tensors]
    assert_same_function(tmp_path / "out", state, HEAD64)


def test_several_rules_give_one_folder_each(cli, tmp_path: Path) -> None:
    code, _, err = cli(
        "apply",
        ROOT / "rules" / "examples" / "tiny-phi-2.yaml",
        ROOT / "rules" / "phi-2.yaml",
        "--out",
        tmp_path / "models",
        "--offline",
        "--quiet",
    )
    assert code == 1 and "not in the cache" in err  # phi-2 needs the hub; everything before it was written
    assert (tmp_path / "models" / "tiny-phi-2" / "model.safetensors").is_file()
    assert not (tmp_path / "models" / "phi-2").exists()


def test_set_overrides_a_source_field(cli, tmp_path: Path) -> None:
    cfg = MsftConfig(vocab_size=80, n_embd=128, n_layer=2, n_head=2, rotary_dim=16)
    state = random_state(cfg, seed=8)
    src = write_checkpoint(tmp_path / "src", state, None)  # no config.json: defaults plus --set
    sets = [
        f"--set={k}={v}"
        for k, v in cfg.to_json().items()
        if k in ("vocab_size", "n_embd", "n_layer", "n_head", "rotary_dim", "n_positions")
    ]
    code, _, err = cli("apply", PHI2, "--source", src, "--out", tmp_path / "out", *sets)
    assert code == 0, err
    assert "config.json not found" in err
    assert_same_function(tmp_path / "out", state, cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device(cli, tmp_path: Path) -> None:
    state = random_state(HEAD80, torch.bfloat16, seed=9)
    src = write_checkpoint(tmp_path / "src", state, HEAD80, shards=2)
    code, _, err = cli(
        "apply", PHI2, "--source", src, "--out", tmp_path / "out", "--device", "cuda", "--dtype", "float32"
    )
    assert code == 0, err
    assert_same_function(tmp_path / "out", state, HEAD80)


def test_cuda_unavailable_is_a_clear_error(cli, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = cli("apply", PHI2, "--out", tmp_path / "o", "--device", "cuda:0")
    assert code == 1 and err.strip() == "error: --device cuda:0: CUDA is not available on this machine"


CONCAT_RULE = r"""version: 1
name: fuse-qkv
source:
  path: src
  config_defaults: {}
target:
  architecture: PhiForCausalLM
  check: false
  config: {hidden_size: 8, num_attention_heads: 2}
steps:
  - name: fuse
    transform:
      match: ['blk\.(?P<i>\d+)\.q', 'blk\.(?P<i>\d+)\.k', 'blk\.(?P<i>\d+)\.v']
      ops: [{concat: {dim: 0}}]
      to: 'blk.{i * 10}.qkv'
  - name: fuse-transposed
    transform:
      match: ['t\.(?P<i>\d+)\.a', 't\.(?P<i>\d+)\.b']
      ops: [{transpose: [0, 1]}, {concat: {dim: 1}}, {permute: [1, 0]}, {cast: bfloat16}]
      to: 't.\g<i>.ab'
"""


def test_concat_joins_patterns_on_named_groups(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    state = {f"blk.{i}.{p}": torch.randn(3 + i, 8, generator=g) for i in range(2) for p in "qkv"}
    state |= {f"t.{i}.{p}": torch.randn(4, 5, generator=g) for i in range(2) for p in "ab"}
    (tmp_path / "src").mkdir()
    save_file(state, tmp_path / "src" / "model.safetensors")
    rule = tmp_path / "fuse.yaml"
    rule.write_text(CONCAT_RULE)
    phi_rules.convert(phi_rules.load_rules(rule), tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == {"blk.0.qkv", "blk.10.qkv", "t.0.ab", "t.1.ab"}
    for i in range(2):
        assert torch.equal(got[f"blk.{i * 10}.qkv"], torch.cat([state[f"blk.{i}.{p}"] for p in "qkv"]))
        want = torch.cat([state[f"t.{i}.a"], state[f"t.{i}.b"]], dim=0).to(torch.bfloat16)
        assert torch.equal(got[f"t.{i}.ab"], want)


@pytest.mark.parametrize("layout", ["phi-msft", "mixformer-sequential"])
def test_tied_embeddings_convert(cli, tmp_path: Path, layout: str) -> None:
    """tie_word_embeddings: the legacy checkpoints store the head beside the embedding it is tied to; detect
    and apply agree that it fits, and the output computes the original function."""
    cfg = MsftConfig(vocab_size=96, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
    state = random_state(cfg, seed=9)
    # The embedding is the head too: at its unit scale the logits reach ~40, where float32's rounding in a
    # different summation order alone is ~1e-5; at a tenth they stay O(1) and 1e-5 still tells a wrong function.
    state["transformer.embd.wte.weight"] *= 0.1
    state["lm_head.linear.weight"] = state["transformer.embd.wte.weight"].clone()
    stored = to_mixformer(state, cfg.n_layer) if layout == "mixformer-sequential" else state
    src = write_checkpoint(tmp_path / "src", stored, cfg)
    (src / "config.json").write_text(json.dumps({**cfg.to_json(), "tie_word_embeddings": True}))
    code, out, err = cli("detect", src)
    assert code == 0 and f"{layout} layout" in out, out + err
    code, _, err = cli("apply", "--source", src, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    assert_same_function(tmp_path / "out", state, cfg)


def test_written_files_are_laid_out_as_the_safetensors_library_writes_them(tmp_path: Path) -> None:
    """Header padded with spaces to 8 bytes (so that memory-mapped tensor data is aligned), compact JSON as
    the library writes it, and every tensor read back by the library itself equal to the source's."""
    import struct

    from safetensors.torch import load_file

    cfg = MsftConfig(vocab_size=97, n_embd=36, n_layer=2, n_head=3, rotary_dim=6)  # odd sizes: odd headers
    state = random_state(cfg, seed=10)
    src = write_checkpoint(tmp_path / "src", state, cfg, shards=2)
    options = phi_rules.Options(source=phi_rules.SourceOptions(source=src), max_shard_bytes=40_000)
    phi_rules.convert(phi_rules.load_rules(PHI2), tmp_path / "out", options)
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 1
    got: dict[str, torch.Tensor] = {}
    for f in files:
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = raw[8 : 8 + n]
        assert n % 8 == 0 and header.rstrip(b" ") == json.dumps(json.loads(header), separators=(",", ":")).encode()
        got |= load_file(f)
    assert torch.equal(got["model.layers.1.self_attn.k_proj.weight"], state["transformer.h.1.mixer.Wqkv.weight"][36:72])
    assert len(got) == len(state) + 4 * cfg.n_layer  # Wqkv weight and bias become three tensors each


@pytest.mark.parametrize(("n_embd", "rotary_dim"), [(176, 30), (208, 60), (400, 58)])
def test_a_rotary_size_the_config_cannot_carry_is_refused(cli, tmp_path: Path, n_embd: int, rotary_dim: int) -> None:
    """head_dim 88 with rotary_dim 30: 30/88 * 88 is 29.999…, and transformers rotates int() of it, 29. The
    output used to be published and fail at its first forward; it is refused, naming what the model would use."""
    cfg = MsftConfig(vocab_size=50, n_embd=n_embd, n_layer=1, n_head=2, rotary_dim=rotary_dim, n_inner=32)
    src = write_checkpoint(tmp_path / "src", random_state(cfg, seed=3), cfg)
    code, _, err = cli("apply", PHI2, "--source", src, "--out", tmp_path / "out", "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert (
        f"would use model.layers.0.self_attn.rotary_ndims = {rotary_dim - 1} where the source means {rotary_dim}" in err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
