"""Real processes and real bytes: a killed apply leaves nothing at DIR; plan reads headers only."""

from __future__ import annotations

import json
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
    """Rule, sources and planning are torch-free: phi-2 is planned from its headers alone."""
    src = write_checkpoint(tmp_path / "src", random_state(MsftConfig(n_layer=3)), MsftConfig(n_layer=3), shards=2)
    program = f"""
import sys
from phi_rules.language.rules import load_rules
from phi_rules.options import SourceOptions
from phi_rules.planning.planner import make_plan
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


def _refuse_materialising(monkeypatch: pytest.MonkeyPatch) -> None:
    from phi_rules.source.checkpoint import Checkpoint

    def materialised(self: Checkpoint, info: object) -> torch.Tensor:
        raise AssertionError(f"tensor read into memory: {info}")

    monkeypatch.setattr(Checkpoint, "load", materialised)


def test_byte_copies_and_casts_never_materialise_a_tensor(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every phi-2 output is a rename or a dim-0 split: all of them go file to file, and with --dtype they
    stream through the cast in chunks; none is read into memory whole."""
    from phi_reference import assert_same_function
    from safetensors.torch import load_file

    cfg = MsftConfig(vocab_size=96, n_layer=2)
    state = random_state(cfg, torch.float16, seed=4)
    src = write_checkpoint(tmp_path / "src", state, cfg, shards=2)
    rules = phi_rules.load_rules(PHI2)
    _refuse_materialising(monkeypatch)
    for dtype in (None, "float32", "bfloat16"):
        options = phi_rules.Options(source=phi_rules.SourceOptions(source=src), dtype=dtype)
        phi_rules.convert(rules, tmp_path / str(dtype), options)
    monkeypatch.undo()
    assert_same_function(tmp_path / "None", state, cfg)
    assert_same_function(tmp_path / "float32", {k: v.float() for k, v in state.items()}, cfg)
    got = load_file(tmp_path / "bfloat16" / "model.safetensors")
    assert torch.equal(got["model.embed_tokens.weight"], state["transformer.embd.wte.weight"].to(torch.bfloat16))
    v = state["transformer.h.1.mixer.Wqkv.weight"].to(torch.bfloat16).chunk(3)[2]
    assert torch.equal(got["model.layers.1.self_attn.v_proj.weight"], v)


def test_moved_elements_are_computed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The other side of the guard above: a de-interleave moves elements, so it goes through torch."""
    from phi_reference import config_436, to_transformers_436

    cfg = MsftConfig(vocab_size=96, n_layer=2)
    src = write_checkpoint(tmp_path / "src", to_transformers_436(random_state(cfg, torch.float16, seed=5), cfg), None)
    (src / "config.json").write_text(json.dumps(config_436(cfg)))
    _refuse_materialising(monkeypatch)
    with pytest.raises(AssertionError, match=r"tensor read into memory: .*query_key_value"):
        phi_rules.convert(
            phi_rules.load_rules(ROOT / "rules" / "transformers-4.36.yaml"),
            tmp_path / "out",
            phi_rules.Options(source=phi_rules.SourceOptions(source=src)),
        )


@pytest.mark.parametrize("to", [torch.float16, torch.float32])
@pytest.mark.parametrize("shard", [300_000, 5 * 10**9])
def test_casts_cut_into_small_pieces_are_exact(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, shard: int, to: torch.dtype
) -> None:
    """Pieces of a few elements, cast on every core and joined across tensors and shards, give exactly
    what torch's ``to`` gives."""
    from safetensors.torch import load_file

    from phi_rules.write import stream

    cfg = MsftConfig(vocab_size=96, n_layer=2)
    state = random_state(cfg, torch.bfloat16, seed=6)
    src = write_checkpoint(tmp_path / "src", state, cfg, shards=2)
    monkeypatch.setattr(stream, "CAST_CHUNK", 998)  # 499 bf16 elements: no piece aligns with a tensor
    to_name = str(to).removeprefix("torch.")
    options = phi_rules.Options(source=phi_rules.SourceOptions(source=src), dtype=to_name, max_shard_bytes=shard)
    phi_rules.convert(phi_rules.load_rules(PHI2), tmp_path / "out", options)
    got = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        got |= load_file(f)
    assert len(got) == 5 + 14 * cfg.n_layer and all(t.dtype == to for t in got.values())
    assert torch.equal(got["lm_head.weight"], state["lm_head.linear.weight"].to(to))
    assert torch.equal(got["model.layers.1.mlp.fc2.weight"], state["transformer.h.1.mlp.fc2.weight"].to(to))
    k = state["transformer.h.0.mixer.Wqkv.bias"].to(to).chunk(3)[1]
    assert torch.equal(got["model.layers.0.self_attn.k_proj.bias"], k)


@pytest.mark.parametrize(("a", "b"), [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_fast_half_cast_is_bit_identical_to_torch(a: torch.dtype, b: torch.dtype) -> None:
    """Every one of the 65536 bit patterns, infinities and subnormals included, twice over so that the
    float32 scratch is used in more than one chunk; a NaN stays a NaN (torch's own path makes it 0x7fc0)."""
    from phi_rules.cast import CHUNK, cast

    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).repeat(2 * CHUNK // 2**16 + 1)
    x = bits.view(a)
    got, want = cast(x, b), x.to(b)
    nan = torch.isnan(x)
    assert got.dtype == b
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    assert torch.isnan(got[nan]).all() and int(nan.sum()) > 0


def test_a_tensor_past_two_gib_is_read_whole(tmp_path: Path) -> None:
    """Linux returns at most 2 GiB from one read call: a larger tensor takes several (a sparse file here)."""
    from phi_rules.source.checkpoint import Checkpoint

    n = 2**31 + 4096
    header = json.dumps({"big": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    path = tmp_path / "big.safetensors"
    with path.open("wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(8 + len(header) + n)
        fh.seek(8 + len(header) + n - 1)
        fh.write(b"\x07")
    with Checkpoint([path]) as ckpt:
        t = ckpt.load(ckpt.tensors["big"])
        assert t.shape == (n,) and int(t[-1]) == 7 and int(t[2**31 - 1]) == 0


def test_copies_without_copy_file_range_are_exact(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """macOS and Windows have no os.copy_file_range: the plain read/write path writes the same bytes."""
    src = write_checkpoint(tmp_path / "src", random_state(BIG, torch.float16, seed=5), BIG, shards=2)
    rules = phi_rules.load_rules(PHI2)
    options = phi_rules.Options(source=phi_rules.SourceOptions(source=src))
    phi_rules.convert(rules, tmp_path / "kernel", options)
    calls: list[int] = []
    real_pread = os.pread

    def counted_pread(fd: int, n: int, offset: int) -> bytes:
        calls.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.delattr(os, "copy_file_range")
    monkeypatch.setattr(os, "pread", counted_pread)
    phi_rules.convert(rules, tmp_path / "portable", options)
    monkeypatch.undo()
    assert sum(calls) >= (tmp_path / "kernel" / "model.safetensors").stat().st_size // 2  # the fallback ran
    assert (tmp_path / "kernel" / "model.safetensors").read_bytes() == (
        tmp_path / "portable" / "model.safetensors"
    ).read_bytes()


def test_an_interrupt_whose_exception_is_swallowed_still_publishes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """CPython drops a KeyboardInterrupt that lands in a finalizer ("Exception ignored in …"): the conversion
    must still not publish. Deterministic: the signal is sent from inside the run, and swallowed there."""
    from phi_rules.write import output

    src = write_checkpoint(tmp_path / "src", random_state(BIG_ENOUGH, torch.float16, seed=6), BIG_ENOUGH)
    real = output.write_config

    def swallowing(*args: object, **kwargs: object) -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs here, and raises
        except KeyboardInterrupt:
            pass  # as a finalizer's caller would
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(output, "write_config", swallowing)
    monkeypatch.setenv("PHI_RULES_CACHE", "")  # no remembered check: write_config runs
    options = phi_rules.Options(source=phi_rules.SourceOptions(source=src))
    with pytest.raises(KeyboardInterrupt):
        phi_rules.convert(phi_rules.load_rules(PHI2), tmp_path / "out", options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


BIG_ENOUGH = MsftConfig(vocab_size=96, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)


def test_a_nested_computation_is_freed_once_its_consumer_ran(tmp_path: Path) -> None:
    """A transform that feeds another (here: a reshape before the q/k/v split) is computed once; its cache
    entry must go when that consumer has run, not stay to the end (every layer's Wqkv, for phi-2)."""
    from phi_rules.source.checkpoint import Checkpoint
    from phi_rules.write.execute import Executor

    cfg = MsftConfig(vocab_size=96, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
    src = write_checkpoint(tmp_path / "src", random_state(cfg, seed=7), cfg)
    rule = tmp_path / "nested.yaml"
    rule.write_text(
        f"version: 1\nname: nested\nextends: {PHI2}\n"
        + r"""edit_steps:
  - name: touch-qkv
    before: split-qkv
    transform:
      match: 'transformer\.h\.(?P<l>\d+)\.mixer\.Wqkv\.(?P<p>weight|bias)'
      ops: [{reshape: input}]
      to: 'transformer.h.\g<l>.mixer.Wqkv.\g<p>'
"""
    )
    options = phi_rules.Options(source=phi_rules.SourceOptions(source=src))
    plan = phi_rules.plan(phi_rules.load_rules(rule), options)
    assert any(len(t.ops()) == 2 for t in plan.tensors)  # reshape, then split: nested
    with Checkpoint(sorted(src.glob("*.safetensors"))) as ckpt:
        executor = Executor(ckpt, plan.tensors, torch.device("cpu"))
        for t in plan.tensors:
            executor.tensor(t)
            assert all(n > 0 for n in executor.uses.values() if n)  # never counted below zero
        assert executor.cache == {}


def test_ctrl_c_while_starting_up_is_one_line(big_source: Path, tmp_path: Path) -> None:
    """Ctrl-C in the first tenths of a second (imports, building the parser, resolving the source) is answered
    like any other: exit 130 and one line, no traceback. Python's own start-up comes before any code of ours
    can answer: the signals land from three times the time a bare interpreter takes to start."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    startup = 3 * (time.perf_counter() - start)
    for delay in sorted({startup, 0.06, 0.08, 0.1, 0.12, 0.16, 0.25, 0.4}):
        if delay < startup:
            continue
        out = tmp_path / f"out-{delay:.3f}"
        proc = subprocess.Popen(
            [*PHI_RULES, "apply", "--source", big_source, "--out", out],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        text = err.decode()
        assert "Traceback" not in text and proc.returncode == 130, (delay, text)
        assert text.strip().splitlines()[-1] == "interrupted: nothing was written"
        assert not out.exists()
