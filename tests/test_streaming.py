"""Real processes and real bytes: a killed apply leaves nothing at DIR; plan reads headers only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PHI_RULES, ROOT
from phi_reference import MsftConfig, random_state, write_checkpoint

import phi_rules

PHI2 = ROOT / "rules" / "phi-2.yaml"
BIG = MsftConfig(vocab_size=4096, n_embd=1024, n_layer=8, n_head=16, rotary_dim=32)  # ~210 MB in fp16


@pytest.fixture(scope="module")
def big_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("big") / "src", random_state(BIG, torch.float16), BIG, shards=2)


def _start_and_wait_for_partial_data(src: Path, out: Path) -> subprocess.Popen[bytes]:
    """Start apply (casting, so every byte goes through torch) and return once it has written data."""
    proc = subprocess.Popen(
        [*PHI_RULES, "apply", PHI2, "--source", src, "--out", out, "--dtype", "float32", "--max-shard-size", "50MB"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        partial = [f for d in out.parent.glob(f".{out.name}.partial-*") for f in d.glob("*.safetensors")]
        if any(f.stat().st_size > 0 for f in partial):
            return proc
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("apply never started writing")


def test_sigkill_mid_write_leaves_nothing_at_dir(big_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _start_and_wait_for_partial_data(big_source, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_mid_write_cleans_up(big_source: Path, tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "out"
    proc = _start_and_wait_for_partial_data(big_source, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.decode().strip().splitlines()[-1] == "interrupted: nothing was written"
    assert list(tmp_path.iterdir()) == []  # neither DIR nor the temporary folder


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_plan_reads_no_tensor_bytes(big_source: Path) -> None:
    rules = phi_rules.load_rules(PHI2)
    options = phi_rules.Options(source=phi_rules.SourceOptions(source=big_source))
    phi_rules.plan(rules, options)  # warm up imports and caches
    before = _bytes_read()
    plan = phi_rules.plan(rules, options)
    read = _bytes_read() - before
    weights = sum(f.stat().st_size for f in big_source.glob("*.safetensors"))
    assert plan.total_bytes == weights - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in big_source.glob("*.safetensors")
    )
    assert read < weights / 100, (read, weights)


def test_renames_and_dim0_splits_are_copied_byte_for_byte(big_source: Path, tmp_path: Path) -> None:
    """The fast path: outputs whose bytes do not change equal the source bytes exactly."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    phi_rules.convert(
        phi_rules.load_rules(PHI2), out, phi_rules.Options(source=phi_rules.SourceOptions(source=big_source))
    )
    src = {}
    for f in big_source.glob("*.safetensors"):
        src |= load_file(f)
    got = load_file(out / "model.safetensors")
    _, k, _ = src["transformer.h.3.mixer.Wqkv.weight"].split(BIG.n_embd)
    assert torch.equal(got["model.layers.3.self_attn.k_proj.weight"], k)
    assert torch.equal(got["model.embed_tokens.weight"], src["transformer.embd.wte.weight"])
    assert os.path.getsize(out / "model.safetensors") < sum(f.stat().st_size for f in big_source.iterdir())


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal, apply shows a byte progress bar per rule; piped, it stays silent but for the summary."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0x0
    rule = ROOT / "rules" / "examples" / "tiny-phi-2.yaml"
    proc = subprocess.Popen([*PHI_RULES, "apply", rule, "--out", tmp_path / "tty"], stderr=follower, cwd=ROOT)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    shown = b"".join(chunks).decode()
    assert "tiny-phi-2: 100%" in shown and "4.14M/4.14M" in shown, shown
    piped = subprocess.run([*PHI_RULES, "apply", rule, "--out", tmp_path / "pipe"], capture_output=True, text=True)
    assert piped.returncode == 0 and "%" not in piped.stderr and "tensors" in piped.stderr


def test_planning_imports_no_torch(tmp_path: Path) -> None:
    """Rules, sources and planning are torch-free: phi-2 is planned from its headers alone."""
    src = write_checkpoint(tmp_path / "src", random_state(MsftConfig(n_layer=3)), MsftConfig(n_layer=3), shards=2)
    program = f"""
import sys
from phi_rules.language.rules import load_rules
from phi_rules.options import SourceOptions
from phi_rules.plan.planner import make_plan
from phi_rules.source.checkpoint import Checkpoint
from phi_rules.source.resolve import resolve
rules = load_rules({str(ROOT / "rules" / "phi-2.yaml")!r})
resolved = resolve(rules, SourceOptions(source=__import__("pathlib").Path({str(src)!r})))
with Checkpoint(resolved.weights) as ckpt:
    plan = make_plan(rules, ckpt.tensors, resolved.config())
assert not plan.problems and len(plan.tensors) == 1 + 14 * 3 + 4, plan.problems
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")))
"""
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_byte_copies_never_materialise_a_tensor(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every phi-2 output is a rename or a dim-0 split: all of them must go file to file, none through torch."""
    from phi_reference import assert_same_function

    from phi_rules.source.checkpoint import Checkpoint

    cfg = MsftConfig(vocab_size=96, n_layer=2)
    state = random_state(cfg, torch.float16, seed=4)
    src = write_checkpoint(tmp_path / "src", state, cfg, shards=2)

    def materialised(self: Checkpoint, info: object) -> torch.Tensor:
        raise AssertionError(f"tensor read into memory: {info}")

    monkeypatch.setattr(Checkpoint, "load", materialised)
    options = phi_rules.Options(source=phi_rules.SourceOptions(source=src))
    phi_rules.convert(phi_rules.load_rules(ROOT / "rules" / "phi-2.yaml"), tmp_path / "out", options)
    monkeypatch.undo()
    assert_same_function(tmp_path / "out", state, cfg)
    with pytest.raises(AssertionError, match="tensor read into memory"):  # a cast must compute, and does
        monkeypatch.setattr(Checkpoint, "load", materialised)
        phi_rules.convert(
            phi_rules.load_rules(ROOT / "rules" / "phi-2.yaml"),
            tmp_path / "cast",
            phi_rules.Options(source=phi_rules.SourceOptions(source=src), dtype="float32"),
        )
