"""The stages that never need torch, run without it (#34): CI runs the ``torch_free`` tests on every Python it has,
where only the torch-free dependencies are installed. Here torch and transformers are made unimportable in a child
process, so that a stage that imports them fails in the main virtualenv too; the checkpoint is a hand-made
safetensors file (headers and zero bytes), as a Phi-3-mini-4k in small."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.torch_free

CONFIG = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "vocab_size": 16,
    "hidden_size": 8,
    "intermediate_size": 12,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
    "sliding_window": 12,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
SHAPES = {
    "model.embed_tokens.weight": [16, 8],
    "model.layers.0.input_layernorm.weight": [8],
    "model.layers.0.post_attention_layernorm.weight": [8],
    "model.layers.0.self_attn.qkv_proj.weight": [24, 8],
    "model.layers.0.self_attn.o_proj.weight": [8, 8],
    "model.layers.0.mlp.gate_up_proj.weight": [24, 8],
    "model.layers.0.mlp.down_proj.weight": [8, 12],
    "model.norm.weight": [8],
    "lm_head.weight": [16, 8],
}
# Run the CLI with torch and transformers unimportable: `import torch` raises ImportError.
BLOCKED = "import sys; sys.modules.update(torch=None, transformers=None); from phi_rules.cli import main; "


def phi3_checkpoint(folder: Path) -> Path:
    """A Phi3 checkpoint by hand: safetensors headers over zero bytes, and its config.json."""
    folder.mkdir()
    header: dict[str, object] = {}
    at = 0
    for name, shape in SHAPES.items():
        size = 4 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [at, at + size]}
        at += size
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(at))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def without_torch(*args: object) -> subprocess.CompletedProcess[str]:
    code = BLOCKED + f"sys.exit(main({[str(a) for a in args]!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("command", [["validate", "rules/"], ["schema"], ["list"], ["--version"]])
def test_rule_commands_need_no_torch(command: list[str]) -> None:
    done = without_torch(*command)
    assert done.returncode == 0, done.stderr
    assert "internal error" not in done.stderr


def test_detect_needs_no_torch(tmp_path: Path) -> None:
    src = phi3_checkpoint(tmp_path / "src")
    done = without_torch("detect", src, "--all")  # the table of every rule
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("phi3-to")}
    assert rows["phi3-to-mistral"].split()[3] == "yes"
    assert rows["phi3-to-llama"].split()[3] == "no" and "sliding window" in rows["phi3-to-llama"]


def test_planning_needs_no_torch(tmp_path: Path) -> None:
    """The plan stage (make_plan) on headers alone, with a refusal accepted and a source field set."""
    src = phi3_checkpoint(tmp_path / "src")
    code = (
        "import sys, json; sys.modules.update(torch=None, transformers=None)\n"
        "from phi_rules.language.rules import load_ref\n"
        "from phi_rules.planning.planner import make_plan\n"
        "from phi_rules.source.header import read_safetensors\n"
        f"src = {str(src)!r}\n"
        "tensors = read_safetensors(__import__('pathlib').Path(src) / 'model.safetensors')\n"
        "config = json.load(open(src + '/config.json'))\n"
        "rules = load_ref('phi3-to-llama')\n"
        "refused = make_plan(rules, tensors, config)\n"
        "accepted = make_plan(rules, tensors, config, accept=('sliding-window',))\n"
        "unset = make_plan(rules, tensors, config, {'sliding_window': None})\n"
        "print(json.dumps([[p.code for p in refused.problems], [p.message for p in accepted.problems],\n"
        "                  [a.exact_up_to for a in accepted.accepted], len(accepted.tensors), unset.problems == []]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [["refused"], [], [12], len(SHAPES) + 3, True]  # qkv in 3, gate_up in 2
