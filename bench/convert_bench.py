"""Benchmark: wall time and peak RSS of `phi-rules apply` (plain and casting to bfloat16, each with the
source hashes computed and with them cached), `plan`, `detect`, `validate` and `verify`, against `cp` of
the same bytes, the floor of a first conversion (`cp` of the shards beside `openssl dgst -sha256` of the
same files: every byte copied and hashed), the imports they cannot avoid, and a seed-style in-memory
conversion, on a generated checkpoint. Every run finds the source in the page cache, as cp does. Prints
figures, ratios and their ranges over alternating rounds; asserts nothing.

    python bench/convert_bench.py                       # phi-2 shape: 5.6 GB fp16 in two shards
    python bench/convert_bench.py --preset phi-3-mini   # Phi-3-mini shape: 7.6 GB bf16, --to llama
    python bench/convert_bench.py --preset small        # a quick run
    python bench/convert_bench.py --start-up            # detect and validate beside `import torch` only

Checkpoints are generated once under bench/data/ (git-ignored) and reused; --start-up needs only their
headers, so it writes the shards sparse (no bytes on disk, nothing random to compute).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    layers: int
    phi3: bool = False  # a Phi3ForCausalLM checkpoint (bf16), converted --to llama; else phi-msft (fp16)


PRESETS = {
    "phi-2": Shape(51200, 2560, 32),
    "small": Shape(51200, 1024, 8),
    "tiny": Shape(1024, 256, 2),
    "phi-3-mini": Shape(32064, 3072, 32, phi3=True),
    "phi-3-small": Shape(32064, 1024, 8, phi3=True),
}


def tensors(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the checkpoint, in the order its own tools write them."""
    return phi3_tensors(shape) if shape.phi3 else msft_tensors(shape)


def phi3_tensors(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Phi-3-mini: 32 heads of 96, no grouped-query, intermediate 8192 (8/3 of the hidden size)."""
    e, i = shape.hidden, shape.hidden * 8 // 3
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, e))]
    for n in range(shape.layers):
        p = f"model.layers.{n}."
        out += [
            (p + "input_layernorm.weight", (e,)),
            (p + "self_attn.qkv_proj.weight", (3 * e, e)),
            (p + "self_attn.o_proj.weight", (e, e)),
            (p + "post_attention_layernorm.weight", (e,)),
            (p + "mlp.gate_up_proj.weight", (2 * i, e)),
            (p + "mlp.down_proj.weight", (e, i)),
        ]
    return [*out, ("model.norm.weight", (e,)), ("lm_head.weight", (shape.vocab, e))]


def msft_tensors(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a phi-msft checkpoint, in phi-2's order."""
    e, i = shape.hidden, 4 * shape.hidden
    out: list[tuple[str, tuple[int, ...]]] = [("transformer.embd.wte.weight", (shape.vocab, e))]
    for n in range(shape.layers):
        p = f"transformer.h.{n}."
        out += [
            (p + "ln.weight", (e,)),
            (p + "ln.bias", (e,)),
            (p + "mixer.Wqkv.weight", (3 * e, e)),
            (p + "mixer.Wqkv.bias", (3 * e,)),
            (p + "mixer.out_proj.weight", (e, e)),
            (p + "mixer.out_proj.bias", (e,)),
            (p + "mlp.fc1.weight", (i, e)),
            (p + "mlp.fc1.bias", (i,)),
            (p + "mlp.fc2.weight", (e, i)),
            (p + "mlp.fc2.bias", (e,)),
        ]
    out += [
        ("lm_head.ln.weight", (e,)),
        ("lm_head.ln.bias", (e,)),
        ("lm_head.linear.weight", (shape.vocab, e)),
        ("lm_head.linear.bias", (shape.vocab,)),
    ]
    return out


def shards(shape: Shape) -> list[tuple[str, bytes, list[tuple[str, tuple[int, ...]]], int]]:
    """Each of the two shards: its file name, its header (length prefix included), its tensors, its data size."""
    items = tensors(shape)
    code = "BF16" if shape.phi3 else "F16"
    half = len(items) // 2
    out = []
    for k, part in enumerate((items[:half], items[half:])):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dims in part:
            size = math.prod(dims) * 2
            header[name] = {"dtype": code, "shape": list(dims), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        out.append((f"model-{k + 1:05d}-of-00002.safetensors", len(raw).to_bytes(8, "little") + raw, part, offset))
    return out


def generate(shape: Shape, folder: Path, *, sparse: bool = False) -> None:
    """Write two safetensors shards tensor by tensor (bounded memory), plus config.json. ``sparse``: the
    tensor data is a hole in the file (all that detect reads is the headers)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, header, part, size in shards(shape):
        with (folder / name).open("wb") as fh:
            fh.write(header)
            if sparse:
                fh.truncate(len(header) + size)
                continue
            import torch

            dtype = torch.bfloat16 if shape.phi3 else torch.float16
            for _, dims in part:
                fh.write((torch.randn(math.prod(dims)) * 0.02).to(dtype).view(torch.int16).numpy().tobytes())
    (folder / "config.json").write_text(json.dumps(config_of(shape), indent=2))
    write_index(folder)


def config_of(shape: Shape) -> dict[str, object]:
    """config.json of the generated checkpoint."""
    config = (
        PHI3_CONFIG | {"vocab_size": shape.vocab, "hidden_size": shape.hidden}
        if shape.phi3
        else {
            "model_type": "phi-msft",
            "vocab_size": shape.vocab,
            "n_embd": shape.hidden,
            "n_layer": shape.layers,
            "n_head": 32,
            "n_inner": None,
            "rotary_dim": 32,
            "n_positions": 2048,
            "layer_norm_epsilon": 1e-5,
            "activation_function": "gelu_new",
            "tie_word_embeddings": False,
        }
    )
    if shape.phi3:
        config |= {"num_hidden_layers": shape.layers, "intermediate_size": shape.hidden * 8 // 3}
    return config


def start_up(shape: str, data: Path, rounds: int) -> None:
    """``detect`` and ``validate rules/`` beside ``import torch``, alternating, medians and per-round ratios."""
    src = data / f"{shape}-headers"
    if not (src / "model.safetensors.index.json").exists():
        generate(PRESETS[shape], src, sparse=True)
    py = sys.executable
    commands = {
        "import torch": [py, "-c", "import torch"],
        "detect": [py, "-m", "phi_rules", "detect", str(src)],
        "validate rules/": [py, "-m", "phi_rules", "validate", "rules/"],
    }
    walls: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, cmd in commands.items():
            start = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            walls.setdefault(name, []).append(time.perf_counter() - start)
    med = {name: statistics.median(w) for name, w in walls.items()}
    figures = ", ".join(f"{n} {w:.2f} s" for n, w in med.items())
    print(f"{shape} headers, medians of {rounds} alternating rounds: {figures}")
    print(
        f"detect / import torch: {med['detect'] / med['import torch']:.2f}x {spread(walls, 'detect', 'import torch')}"
        f"   validate rules/: {med['validate rules/']:.2f} s"
    )


def write_index(folder: Path) -> None:
    """model.safetensors.index.json, as save_pretrained writes it beside shards (rules find shards by it)."""
    weight_map = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        with shard.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            names = [k for k in json.loads(fh.read(n)) if k != "__metadata__"]
        weight_map |= dict.fromkeys(names, shard.name)
    total = sum(p.stat().st_size for p in folder.glob("model-*"))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# Phi-3-mini-4k-instruct's config.json as the hub has it, less its sliding window (Llama has none).
PHI3_CONFIG = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


SEED_STYLE = """
import sys, torch
from safetensors.torch import load_file, save_file
src, out = sys.argv[1], sys.argv[2]
state = {}
for f in sys.argv[3:]:
    state.update(load_file(f"{src}/{f}"))
converted = {}
for key in sorted(state):
    t = state.pop(key)
    if "Wqkv" in key:
        layer, kind = key.split(".")[2], key.rsplit(".", 1)[1]
        for part, name in zip(t.chunk(3), ("q_proj", "k_proj", "v_proj")):
            converted[f"model.layers.{layer}.self_attn.{name}.{kind}"] = part.contiguous()
        continue
    new = key.replace("transformer.embd.wte", "model.embed_tokens").replace("lm_head.linear", "lm_head")
    new = new.replace("lm_head.ln", "model.final_layernorm").replace("transformer.h.", "model.layers.")
    new = new.replace(".ln.", ".input_layernorm.").replace("mixer.out_proj", "self_attn.dense")
    converted[new] = t
save_file(converted, f"{out}/model.safetensors", metadata={"format": "pt"})
"""


PLAN_IN_PROCESS = """
import sys, time
from pathlib import Path
import phi_rules
rules = phi_rules.load_rules("rules/phi-2.yaml")
options = phi_rules.Options(source=phi_rules.SourceOptions(source=Path(sys.argv[1])))
phi_rules.plan(rules, options)  # first call imports transformers' Phi modules
start = time.perf_counter()
plan = phi_rules.plan(rules, options)
print(f"    (plan of {len(plan.tensors)} tensors, {plan.total_bytes / 1e9:.2f} GB: "
      f"{time.perf_counter() - start:.3f} s in process)", file=sys.stderr)
"""


def measure(cmd: list[str], label: str, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process, via wait4's rusage for that child alone.

    Dirty pages left by earlier runs are flushed first, so no run pays for another's writeback.
    """
    os.sync()
    time.sleep(1)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, env=None if env is None else os.environ | env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{label} failed: {' '.join(cmd)}")
    rss = usage.ru_maxrss / 1024
    print(f"  {label:<40} {wall:7.2f} s   {rss:8.0f} MB peak RSS", flush=True)
    return wall, rss


def spread(walls: dict[str, list[float]], name: str, base: str) -> str:
    """The range of the per-round ratios (each round's run against the same round's base)."""
    ratios = [a / b for a, b in zip(walls[name], walls[base], strict=True)]
    return f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="phi-2")
    parser.add_argument("--data", type=Path, default=ROOT / "bench" / "data")
    parser.add_argument("--rounds", type=int, default=3, help="alternating cp/apply rounds (median reported)")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start-up", action="store_true", help="only detect and validate beside import torch")
    args = parser.parse_args()
    if args.start_up:
        start_up(args.preset, args.data, max(args.rounds, 5))
        return
    src = args.data / args.preset
    if args.generate_only:
        generate(PRESETS[args.preset], src)
        return
    if not (src / "config.json").exists():
        print(f"generating {args.preset} checkpoint in {src} …", flush=True)
        # In a child: this process must stay small, since a child's peak RSS starts from its parent's at fork.
        subprocess.run(
            [sys.executable, __file__, "--preset", args.preset, "--data", str(args.data), "--generate-only"], check=True
        )
    if not (src / "model.safetensors.index.json").exists():  # data generated before the index was written
        write_index(src)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    size = sum((src / s).stat().st_size for s in shards)
    print(f"{args.preset}: {size / 1e9:.2f} GB in {len(shards)} shards, {os.cpu_count()} cores", flush=True)
    out = args.data / "out"
    py = sys.executable
    cli = [py, "-m", "phi_rules"]
    tokenizer = ["--tokenizer", "rules/examples/tiny-phi-2"]  # GPT-2's files, as a real phi-2 output has them

    def fresh() -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)

    phi3 = PRESETS[args.preset].phi3
    rule = ["--to", "llama"] if phi3 else ["rules/phi-2.yaml"]  # Phi3 sources: detected, --to picks Llama
    modeling = "transformers.models.llama.modeling_llama" if phi3 else "transformers.models.phi.modeling_phi"
    fresh()
    measure(["cat", *(str(src / s) for s in shards)], "warm the page cache (cat)")
    torch_wall, _ = measure([py, "-c", "import torch"], "import torch")
    imp_wall, _ = measure([py, "-c", f"import {modeling}"], f"import {modeling.rsplit('.', 1)[1]}")
    plan_wall, _ = measure([*cli, "plan", *rule, "--source", str(src), "--json"], "phi-rules plan")
    detect_wall, detect_rss = measure([*cli, "detect", str(src)], "phi-rules detect")
    validate_wall, _ = measure([*cli, "validate", "rules/"], "phi-rules validate rules/")
    if not phi3:
        measure([py, "-c", PLAN_IN_PROCESS, str(src)], "phi_rules.plan() after imports")
    cache = args.data / "cache"  # PHI_RULES_CACHE: source digests in sha256/, passed target checks in checked/
    apply = [*cli, "apply", *rule, "--source", str(src), "--out", str(out), "--quiet", *tokenizer]
    files = " ".join(str(src / s) for s in shards)
    floor = ["sh", "-c", f"cp {files} {out} & openssl dgst -sha256 {files} > /dev/null; wait"]
    cast = [*apply, "--dtype", "bfloat16"]
    walls: dict[str, list[float]] = {}
    rss: dict[str, float] = {}

    def run(name: str, cmd: list[str], label: str, forget: str | None = None) -> None:
        if forget is not None:  # "sha256": the source digests; "": everything
            shutil.rmtree(cache / forget, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        wall, peak = measure(cmd, label, {"PHI_RULES_CACHE": str(cache)})
        walls.setdefault(name, []).append(wall)
        rss[name] = max(rss.get(name, 0.0), peak)

    for _ in range(args.rounds):  # alternate, so that neither always runs on a warmer machine
        fresh()
        walls.setdefault("cp", []).append(measure(["cp", *(str(src / s) for s in shards), str(out)], "cp")[0])
        fresh()
        walls.setdefault("floor", []).append(measure(floor, "floor: cp beside openssl dgst -sha256")[0])
        run("fresh", apply, "apply, nothing remembered", forget="")
        run("cold", apply, "apply, hashes not remembered (check is)", forget="sha256")
        run("cast-cold", cast, "apply --dtype bfloat16, hashes not rem.", forget="sha256")
        run("cast-warm", cast, "apply --dtype bfloat16, cached")
        run("warm", apply, "apply, source hashes cached")  # last: verify checks this output
    verify_wall, verify_rss = measure([*cli, "verify", "--source", str(src), str(out)], "phi-rules verify")
    shutil.rmtree(out)
    durable, _ = measure([*apply, "--fsync"], "phi-rules apply --fsync (cached)", {"PHI_RULES_CACHE": str(cache)})
    fresh()
    cp_sync, _ = measure(["sh", "-c", f"cp {' '.join(str(src / s) for s in shards)} {out} && sync"], "cp && sync")
    fresh()
    seed_wall, seed_rss = math.nan, math.nan
    if not phi3:
        seed_wall, seed_rss = measure([py, "-c", SEED_STYLE, str(src), str(out), *shards], "seed-style in-memory")
    shutil.rmtree(out)
    med = {name: statistics.median(w) for name, w in walls.items()}
    print(f"medians of {args.rounds} alternating rounds: " + ", ".join(f"{n} {w:.2f} s" for n, w in med.items()))
    print(f"floor / cp: {med['floor'] / med['cp']:.2f}x  {spread(walls, 'floor', 'cp')}")
    for name, base, what in (
        ("fresh", "floor", "first apply / floor, nothing remembered"),
        ("cold", "floor", "first apply / floor, target check known"),
        ("warm", "cp", "apply / cp, source hashes cached"),
        ("cast-cold", "floor", "apply --dtype bfloat16 / floor, hashing"),
        ("cast-warm", "cp", "apply --dtype bfloat16 / cp, cached"),
    ):
        ratio = med[name] / med[base]
        print(f"{what:<42} {ratio:.2f}x  {spread(walls, name, base)}  (peak RSS {rss[name]:.0f} MB)")
    print(
        f"apply --fsync / (cp && sync): {durable / cp_sync:.2f}x\n"
        f"plan: {plan_wall:.2f} s = import {modeling.rsplit('.', 1)[1]} {imp_wall:.2f} s"
        f" + {plan_wall - imp_wall:.2f} s   "
        f"detect / import torch: {detect_wall / torch_wall:.2f}x ({detect_wall:.2f} s, {detect_rss:.0f} MB)   "
        f"validate rules/: {validate_wall:.2f} s\n"
        f"verify: {verify_wall:.2f} s, peak RSS {verify_rss:.0f} MB   "
        f"apply (cached) / seed-style wall: {med['warm'] / seed_wall:.2f}x   "
        f"seed-style / apply peak RSS: {seed_rss / rss['warm']:.1f}x"
    )


if __name__ == "__main__":
    main()
