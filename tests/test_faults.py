"""The fault matrix: bad rule files, bad sources, hostile outputs and usage errors, one row each.

Every row asserts: the exit code (1 for a problem, 2 for bad usage), no traceback, a message naming
the file or key at fault, nothing at --out and no temporary folder or lock left behind. The faults guide
(docs/guides/faults.md) lists the matrix.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import PHI_RULES, ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from phi_reference import MsftConfig, random_state, write_checkpoint

import phi_rules

CFG = MsftConfig(vocab_size=96, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
PHI2 = str(ROOT / "rules" / "phi-2.yaml")


def good(tmp: Path) -> Path:
    """A valid phi-msft checkpoint (safetensors, with config.json)."""
    return write_checkpoint(tmp / "src", random_state(CFG, seed=1), CFG)


def rule(tmp: Path, text: str | bytes) -> Path:
    path = tmp / "rule.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def variant(tmp: Path, changes: str) -> Path:
    return rule(tmp, f"version: 1\nname: variant\nextends: {PHI2}\n{changes}")


def apply(tmp: Path, rule_file: object, src: Path | None = None, *extra: object) -> list[object]:
    return ["apply", rule_file, "--source", src or good(tmp), "--out", tmp / "out", *extra]


def safetensors(tmp: Path, header: bytes | dict[str, object], data: bytes = b"", length: int | None = None) -> Path:
    """A hand-made safetensors file in a source folder (with a valid config.json)."""
    folder = tmp / "src"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CFG.to_json()))
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return folder


def entry(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape or [2], "data_offsets": offsets or [0, 8]}


INFINITE_SPLIT = """edit_steps:
  - name: infinite
    before: split-qkv
    transform:
      from: transformer.h.{i}.mixer.Wqkv
      ops: [{split: {dim: 0, sizes: ['1e999', '1e999 - 1e999']}}]
      to: ['transformer.h.{i}.mixer.Wqkv', 'transformer.h.{i}.mixer.rest']
"""


def with_source(tmp: Path, change: Callable[[Path], None]) -> list[object]:
    src = good(tmp)
    change(src)
    return apply(tmp, PHI2, src)


def shard_index(tmp: Path, weight_map: object) -> list[object]:
    def change(src: Path) -> None:
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    return with_source(tmp, change)


def config(tmp: Path, text: str) -> list[object]:
    return with_source(tmp, lambda src: (src / "config.json").write_text(text))


def state_source(tmp: Path, change: Callable[[dict[str, torch.Tensor]], None], **kw: object) -> list[object]:
    state = random_state(CFG, seed=1)
    change(state)
    return apply(tmp, PHI2, write_checkpoint(tmp / "src", state, CFG, **kw))  # type: ignore[arg-type]


def hostile_pickle(tmp: Path) -> list[object]:
    class Evil:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, ("touch pwned",))

    (tmp / "src").mkdir()
    torch.save({"x": Evil()}, tmp / "src" / "pytorch_model.bin")
    return apply(tmp, PHI2, tmp / "src")


def symlink_loop(tmp: Path) -> list[object]:
    (tmp / "src").mkdir()
    (tmp / "src" / "model.safetensors").symlink_to("model.safetensors")
    return apply(tmp, PHI2, tmp / "src")


def out_is_a_file(tmp: Path) -> list[object]:
    (tmp / "out").write_text("x")
    return apply(tmp, PHI2)


def out_not_empty(tmp: Path) -> list[object]:
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return apply(tmp, PHI2)


def lock_held(tmp: Path) -> list[object]:
    """Another apply is writing the same --out: its lock is held by a process of ours."""
    import fcntl

    fd = os.open(tmp / ".out.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    HELD.append(fd)
    return apply(tmp, PHI2)


HELD: list[int] = []


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path], list[object]]
    code: int
    says: str  # formatted with tmp=the case's folder; must appear in the output
    out_may_exist: bool = False  # the fault is that --out already exists


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefg", "bcdefgh", strict=True)
)
CASES = [
    # --- rule files -------------------------------------------------------------------------------
    Case("yaml-malformed", lambda t: apply(t, rule(t, "version: [1\n")), 1, "{tmp}/rule.yaml:2:1: YAML syntax error"),
    Case("yaml-duplicate-key", lambda t: apply(t, rule(t, "version: 1\nversion: 1\n")), 1, "duplicate key 'version'"),
    Case("wrong-type", lambda t: apply(t, variant(t, "target: {check: maybe}\n")), 1, "target/check: 'maybe' is not"),
    Case("unknown-key", lambda t: apply(t, variant(t, "colour: red\n")), 1, "{tmp}/rule.yaml:4:1: colour: unknown key"),
    Case(
        "bad-regex", lambda t: apply(t, variant(t, "edit_steps: [{name: x, drop: '('}]\n")), 1, "bad regular expression"
    ),
    Case(  # a backtracking engine takes exponential time here; RE2 answers at once: the step matches nothing
        "catastrophic-regex",
        lambda t: apply(t, variant(t, "edit_steps: [{name: x, drop: '(a|aa)+b'}]\n"), state_source_long(t)),
        1,
        "step 'x': matched no tensor",
    ),
    Case(
        "lookaround-regex",
        lambda t: apply(t, variant(t, "edit_steps: [{name: x, drop: '(?!a)b'}]\n")),
        1,
        "bad regular expression '(?!a)b': invalid perl operator: (?! (RE2 syntax: no lookarounds or backreferences)",
    ),
    Case("unknown-name", lambda t: apply(t, variant(t, "let: {x: n_emdb * 2}\n")), 1, "unknown name 'n_emdb'"),
    Case(
        "division-by-zero",
        lambda t: apply(t, variant(t, "target: {config: {partial_rotary_factor: rotary_dim / 0}}\n")),
        1,
        "target/config/partial_rotary_factor: cannot compute partial_rotary_factor: division by zero",
    ),
    Case(
        "huge-number",
        lambda t: apply(t, variant(t, "target: {config: {hidden_size: n_embd * 100000000000000}}\n")),  # < int64
        1,
        "PhiForCausalLM cannot be built from the config",
    ),
    Case("non-utf8", lambda t: apply(t, rule(t, b"version: 1\nname: \xff\xfe\n")), 1, "cannot read rule file"),
    Case("empty-file", lambda t: apply(t, rule(t, "")), 1, "{tmp}/rule.yaml:1:1"),
    Case("directory-named-yaml", lambda t: apply(t, folder(t, "dir.yaml")), 1, "cannot read rule file: Is a directory"),
    Case("alias-bomb", lambda t: apply(t, rule(t, ALIAS_BOMB)), 1, "too large or too deeply nested"),
    Case(
        "python-tag",
        lambda t: apply(t, rule(t, "version: !!python/object/apply:os.system ['touch pwned']\n")),
        1,
        "YAML syntax error",
    ),
    Case("abstract-rule", lambda t: apply(t, ROOT / "rules" / "layouts" / "phi-msft.yaml"), 1, "abstract"),
    Case("unknown-rule-name", lambda t: apply(t, "phi-3"), 1, "phi-3: no such rule file, and no shipped rule"),
    Case(
        "extends-missing",
        lambda t: apply(t, rule(t, "version: 1\nname: x\nextends: nope.yaml\n")),
        1,
        "{tmp}/rule.yaml:3:10: extends: base rule 'nope.yaml' not found",
    ),
    # --- sources ----------------------------------------------------------------------------------
    Case("source-missing", lambda t: apply(t, PHI2, t / "nowhere"), 1, "{tmp}/nowhere: source not found"),
    Case("source-empty", lambda t: apply(t, PHI2, folder(t, "empty")), 1, "{tmp}/empty: no weights found"),
    Case(
        "index-missing-shard",
        lambda t: shard_index(t, {"x": "model-00009-of-00009.safetensors"}),
        1,
        "listed but missing",
    ),
    Case(
        "index-path-traversal",
        lambda t: shard_index(t, {"x": "../../etc/passwd"}),
        1,
        "which is not a file beside the index",
    ),
    Case(
        "index-not-json",
        lambda t: with_source(t, lambda s: (s / "model.safetensors.index.json").write_text("{")),
        1,
        "model.safetensors.index.json: not a valid index file",
    ),
    Case("index-wrong-shape", lambda t: shard_index(t, ["model.safetensors"]), 1, "not a valid index file"),
    Case(
        "truncated-safetensors",
        lambda t: apply(t, PHI2, safetensors(t, {"w": entry()}, b"\0" * 4)),
        1,
        "tensor 'w' lies beyond the end of the file",
    ),
    Case(
        "header-longer-than-file",
        lambda t: apply(t, PHI2, safetensors(t, {"w": entry()}, b"", length=10**6)),
        1,
        "header length 1000000 is impossible",
    ),
    Case("header-not-json", lambda t: apply(t, PHI2, safetensors(t, b"{not json")), 1, "header is not JSON"),
    Case("header-not-object", lambda t: apply(t, PHI2, safetensors(t, b"[1, 2]")), 1, "header is not a JSON object"),
    Case(
        "overlapping-offsets",
        lambda t: apply(t, PHI2, safetensors(t, {"a": entry(offsets=[0, 8]), "b": entry(offsets=[4, 12])}, b"\0" * 12)),
        1,
        "overlap in the file",
    ),
    Case(
        "out-of-range-offsets",
        lambda t: apply(t, PHI2, safetensors(t, {"w": entry(offsets=[96, 104])}, b"\0" * 8)),
        1,
        "lies beyond the end",
    ),
    Case(
        "negative-offsets",
        lambda t: apply(t, PHI2, safetensors(t, {"w": entry(offsets=[-8, 0])}, b"\0" * 8)),
        1,
        "malformed safetensors entry for tensor 'w'",
    ),
    Case(
        "unknown-dtype",
        lambda t: apply(t, PHI2, safetensors(t, {"w": entry(dtype="F7")}, b"\0" * 8)),
        1,
        "malformed safetensors entry for tensor 'w'",
    ),
    Case(
        "shape-byte-mismatch",
        lambda t: apply(t, PHI2, safetensors(t, {"w": entry(shape=[3])}, b"\0" * 8)),
        1,
        "data_offsets do not match shape [3]",
    ),
    Case("zero-length-file", lambda t: apply(t, PHI2, zero_file(t)), 1, "not a safetensors file: too short"),
    Case("symlink-loop", symlink_loop, 1, "no weights found"),
    Case("hostile-pickle", hostile_pickle, 1, "pytorch_model.bin: refused to load"),
    Case(
        "bin-not-a-pickle",
        lambda t: with_source_bin(t, b"\x00garbage" * 100),
        1,
        "pytorch_model.bin: not a weights file (neither safetensors nor a PyTorch .bin",
    ),
    Case("config-not-json", lambda t: config(t, "{oops"), 1, "config.json: cannot read the source config"),
    Case("config-not-object", lambda t: config(t, "[1]"), 1, "config.json: the source config is not a JSON object"),
    Case("config-wrong-type", lambda t: config(t, json.dumps({**CFG.to_json(), "n_embd": "big"})), 1, "'big'"),
    Case("sizes-do-not-divide", lambda t: config(t, json.dumps({**CFG.to_json(), "n_head": 3})), 1, "step 'split-qkv'"),
    Case("config-nan", lambda t: config(t, json.dumps({**CFG.to_json(), "n_embd": float("nan")})), 1, "n_embd: nan"),
    Case("config-zero-layers", lambda t: config(t, json.dumps({**CFG.to_json(), "n_layer": 0})), 1, "counts: refused"),
    Case("config-negative-layers", lambda t: config(t, json.dumps({**CFG.to_json(), "n_layer": -1})), 1, "refused: n_"),
    Case(
        "config-huge-integer",
        lambda t: config(t, json.dumps({**CFG.to_json(), "rotary_dim": int("9" * 400)})),
        1,
        "{tmp}/src/config.json: rotary_dim: an integer of 1329 bits is too large",
    ),
    Case(
        "rule-number-out-of-range",
        lambda t: apply(t, variant(t, "let: {x: 1e999 - 1e999}\n")),
        1,
        "{tmp}/rule.yaml:4:10: let/x: bad expression '1e999 - 1e999': the number 1e999 is out of range",
    ),
    Case("rule-infinite-number", lambda t: apply(t, variant(t, "let: {x: .inf}\n")), 1, "let/x: bad number: inf"),
    Case(
        "rule-infinite-split-size",
        lambda t: apply(t, variant(t, INFINITE_SPLIT)),
        1,
        "ops/0/split/sizes/0: bad expression '1e999': the number 1e999 is out of range",
    ),
    Case("set-nan", lambda t: [*apply(t, PHI2), "--set", "n_head=NaN"], 2, "n_head=NaN: nan is not a finite number"),
    Case("set-infinity", lambda t: [*apply(t, PHI2), "--set", "n_head_kv=Infinity"], 2, "inf is not a finite number"),
    Case(
        "missing-layer",
        lambda t: state_source(t, lambda s: [s.pop(k) for k in list(s) if ".h.1." in k]),
        1,
        "does not produce",
    ),
    Case(
        "extra-tensor",
        lambda t: state_source(t, lambda s: s.update({"transformer.extra": torch.zeros(1)})),
        1,
        "consumed by no step (rename or drop them): transformer.extra",
    ),
    Case("name-in-two-shards", lambda t: two_shards_one_name(t), 1, "is in both"),
    Case(
        "weights-file-is-json",
        lambda t: apply(t, PHI2, good(t) / "config.json"),
        1,
        "config.json: not a weights file",
    ),
    Case(
        "set-rejected-by-config",
        lambda t: ["plan", PHI2, "--source", good(t), "--set", "hidden_act=3"],
        1,
        "PhiConfig rejected the config",
    ),
    # --- outputs ----------------------------------------------------------------------------------
    Case("out-is-a-file", out_is_a_file, 1, "{tmp}/out: exists and is not a folder", out_may_exist=True),
    Case("out-not-empty", out_not_empty, 1, "folder exists and is not empty (use --force", out_may_exist=True),
    Case(
        "unwritable-parent",
        lambda t: ["apply", PHI2, "--source", good(t), "--out", "/proc/phi-rules/out"],
        1,
        "cannot write the output here",
    ),
    Case("another-apply-writes-out", lock_held, 1, "another phi-rules apply is writing this folder"),
    # --- usage ------------------------------------------------------------------------------------
    Case("no-arguments", lambda t: [], 2, "usage: phi-rules"),
    Case("unknown-command", lambda t: ["convert"], 2, "invalid choice: 'convert'"),
    Case("apply-without-out", lambda t: ["apply", PHI2], 2, "the following arguments are required: --out"),
    Case("bad-shard-size", lambda t: [*apply(t, PHI2), "--max-shard-size", "lots"], 2, "bad size 'lots'"),
    Case("bad-device", lambda t: [*apply(t, PHI2), "--device", "tpu"], 2, "expected cpu, cuda or cuda:N"),
    Case("bad-set", lambda t: [*apply(t, PHI2), "--set", "novalue"], 2, "expected NAME=VALUE"),
    Case("bad-dtype", lambda t: [*apply(t, PHI2), "--dtype", "float8"], 2, "invalid choice: 'float8'"),
    Case(
        "source-with-several-rules",
        lambda t: ["apply", PHI2, PHI2, "--source", good(t), "--out", t / "out"],
        2,
        "--source takes one rule file",
    ),
    Case("no-rule-no-source", lambda t: ["apply", "--out", t / "out"], 2, "give a rule file, or --source"),
    Case("verify-without-source", lambda t: ["verify", t / "out"], 2, "verify needs --source"),
]


def state_source_long(tmp: Path) -> Path:
    """A source with a very long tensor name, on which a backtracking pattern would hang."""
    state = random_state(CFG, seed=1) | {"a" * 5000: torch.zeros(1)}
    return write_checkpoint(tmp / "src", state, CFG)


def zero_file(tmp: Path) -> Path:
    src = safetensors(tmp, b"")
    (src / "model.safetensors").write_bytes(b"")
    return src


def folder(tmp: Path, name: str) -> Path:
    (tmp / name).mkdir()
    return tmp / name


def with_source_bin(tmp: Path, data: bytes) -> list[object]:
    (tmp / "src").mkdir()
    (tmp / "src" / "pytorch_model.bin").write_bytes(data)
    return apply(tmp, PHI2, tmp / "src")


def two_shards_one_name(tmp: Path) -> list[object]:
    src = write_checkpoint(tmp / "src", random_state(CFG, seed=1), CFG, shards=2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    from safetensors.torch import save_file

    save_file({"lm_head.linear.bias": torch.zeros(CFG.vocab_size)}, src / "model-00001-of-00002.safetensors")
    index["weight_map"]["lm_head.linear.bias"] = "model-00001-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return apply(tmp, PHI2, src)


def leftovers(tmp: Path) -> list[str]:
    return sorted(
        p.name for p in tmp.rglob(".*") if ".partial-" in p.name or p.name.endswith(".lock") or ".old-" in p.name
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(cli, tmp_path: Path, case: Case) -> None:
    args = case.make(tmp_path)
    try:
        code, out, err = cli(*args)
    finally:
        for fd in HELD:
            os.close(fd)
        HELD.clear()
        (tmp_path / ".out.lock").unlink(missing_ok=True)  # the lock this test held for another apply
    shown = out + err
    assert code == case.code, shown
    assert "Traceback" not in shown
    assert case.says.format(tmp=tmp_path) in shown, shown
    if code == 1:
        assert all(line.startswith(("error:", "note:", "warning:", str(tmp_path), "/")) for line in err.splitlines()), (
            err
        )
    if not case.out_may_exist:
        assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []
    assert not (ROOT / "pwned").exists() and not (tmp_path / "pwned").exists()


def test_matrix_is_large_enough() -> None:
    assert len(CASES) >= 50


def _child(*args: object, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PHI_RULES, *map(str, args)], capture_output=True, text=True, timeout=180, **kw)  # type: ignore[call-overload, no-any-return]


def test_disk_full_leaves_nothing(tmp_path: Path) -> None:
    """A write that the file system refuses (here: a file-size limit, as a full disk refuses) is one line."""
    import resource

    src = good(tmp_path)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    run = _child("apply", PHI2, "--source", src, "--out", tmp_path / "out", "--quiet", preexec_fn=limit)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "cannot write the output: File too large" in run.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_each_shard_gets_its_room_before_a_byte_is_copied(tmp_path: Path) -> None:
    """The writer asks for every shard's final size when it opens it: a file system without room refuses
    there, before any copy (here a file-size limit below the shard's size, as a full disk refuses)."""
    import errno
    import resource

    from phi_rules.write.safetensors import SafetensorsWriter

    plan = phi_rules.plan(phi_rules.load_rules(PHI2), phi_rules.Options(source=phi_rules.SourceOptions(good(tmp_path))))
    data = sum(t.nbytes for t in plan.tensors)  # the shard holds these bytes after its header
    (tmp_path / "room").mkdir()
    writer = SafetensorsWriter(tmp_path / "room", plan.tensors, 1 << 40, {})
    try:
        (shard,) = writer.names
        assert os.stat(tmp_path / "room" / shard).st_blocks * 512 >= data  # blocks held, no data written yet
    finally:
        writer.close()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    before = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (data // 2, hard))
    try:
        with pytest.raises(OSError) as refused:
            SafetensorsWriter(tmp_path / "room", plan.tensors, 1 << 40, {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, before)
    assert refused.value.errno == errno.EFBIG and str(refused.value.filename).endswith(shard)


def test_force_replacing_a_good_folder_keeps_it_when_the_new_conversion_fails(cli, tmp_path: Path) -> None:
    src = good(tmp_path)
    assert cli("apply", PHI2, "--source", src, "--out", tmp_path / "out", "--quiet")[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    (src / "config.json").write_text("{broken")
    code, _, err = cli("apply", PHI2, "--source", src, "--out", tmp_path / "out", "--force")
    assert code == 1 and "cannot read the source config" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert leftovers(tmp_path) == []


def test_two_concurrent_applies_to_one_out(tmp_path: Path) -> None:
    """Started together: exactly one writes the folder, the other fails with one line; the folder is whole."""
    src = good(tmp_path)
    args = [*PHI_RULES, "apply", PHI2, "--source", str(src), "--out", str(tmp_path / "out"), "--quiet"]
    procs = [subprocess.Popen(args, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=180), p.stderr.read() if p.stderr else "") for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    (failed,) = [err for code, err in results if code == 1]
    assert "another phi-rules apply is writing" in failed or "folder exists and is not empty" in failed
    assert "Traceback" not in failed
    from phi_reference import assert_same_function

    assert_same_function(tmp_path / "out", random_state(CFG, seed=1), CFG)
    assert leftovers(tmp_path) == []


def test_a_bug_is_one_line_and_its_traceback_only_shown_with_debug(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from phi_rules import cli as module
    from phi_rules.cli import commands

    def broken(_: object) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(commands, "list_command", broken)
    code, _, err = cli("list")
    assert code == 1 and err.strip() == "error: internal error (RuntimeError: boom); rerun with --debug to report it"
    with pytest.raises(RuntimeError, match="boom"):
        module.main(["--debug", "list"])


# --- fuzzing: random safetensors headers and lengths given to plan: only PhiRulesError, never a crash --------
small = st.integers(min_value=-3, max_value=70)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F7", "", 3]),
        "shape": st.one_of(st.lists(small, max_size=3), st.text(max_size=3), st.none()),
        "data_offsets": st.one_of(st.lists(small, min_size=0, max_size=3), st.just("x")),
    },
)
headers = st.one_of(
    st.binary(max_size=64),
    st.dictionaries(st.text(max_size=8), st.one_of(entries, st.integers(), st.none()), max_size=4).map(
        lambda d: json.dumps(d).encode()
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=headers,
    length=st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)),
    data=st.binary(max_size=80),
)
def test_fuzzed_safetensors_headers_never_crash_plan(
    tmp_path: Path, header: bytes, length: int | None, data: bytes
) -> None:
    folder = tmp_path / "fuzz"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CFG.to_json()))
    (folder / "model.safetensors").write_bytes(
        struct.pack("<Q", len(header) if length is None else length) + header + data
    )
    rules = phi_rules.load_rules(PHI2)
    with pytest.raises(phi_rules.PhiRulesError):
        phi_rules.plan(rules, phi_rules.Options(source=phi_rules.SourceOptions(source=folder)))


def test_the_faults_guide_lists_the_matrix() -> None:
    guide = (ROOT / "docs" / "guides" / "faults.md").read_text()
    assert all(f"| `{c.name}` |" in guide for c in CASES)


@pytest.mark.parametrize("content", [b"hello world\n", (ROOT / "README.md").read_bytes()], ids=["text", "readme"])
@pytest.mark.parametrize("command", ["apply", "detect"])
def test_a_text_file_as_source_is_named_as_such(cli, tmp_path: Path, content: bytes, command: str) -> None:
    src = tmp_path / "notes.md"
    src.write_bytes(content)
    args = ["apply", "--source", src, "--out", tmp_path / "out"] if command == "apply" else ["detect", src]
    code, _, err = cli(*args)
    assert code == 1 and err.strip() == (
        f"error: {src}: not a weights file (neither safetensors nor a PyTorch .bin: it starts with {content[:4]!r}); "
        "give the checkpoint's folder or its .safetensors/.bin file"
    ), err
    assert not (tmp_path / "out").exists()


def test_a_mistyped_local_path_is_not_a_hub_repository(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ckpt/msfT` where ckpt/ is a folder here: not found at once, no request to any hub."""
    import socket

    good(tmp_path)
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    with socket.socket() as silent:  # a hub that accepts connections and never answers: a request would hang
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        code, _, err = cli("apply", "--source", "ckpt/msfT", "--out", "out")
    assert code == 1 and err.strip() == "error: ckpt/msfT: source not found", err
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "args",
    [["list", "--json"], ["plan", PHI2, "--source", str(ROOT / "rules/examples/tiny-phi-2"), "--quiet"]],
    ids=["list", "plan"],
)
def test_output_cut_short_by_its_reader_is_no_error(tmp_path: Path, args: list[str]) -> None:
    """`phi-rules plan … | head`: the reader has what it wanted; exit 0, nothing on stderr. The reader here
    (`true`) is gone before anything is written, so every write meets a closed pipe: with `head -c 1` the output
    could fit the pipe's buffer and never see one, and the test would pass without its subject."""
    command = " ".join([*PHI_RULES, *args])
    run = subprocess.run(
        f"{command} 2>{tmp_path}/err.txt | true; echo ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.stdout.strip() == "0"
    assert (tmp_path / "err.txt").read_text() == ""


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("n_embd=abc", "--set n_embd=abc: n_embd is a number (the source has 64)"),
        ("n_head=3", "--set n_head=3: the conversion does not fit with it: "),
        (
            "n_embed=128",
            "--set n_embed: neither a source field this rule reads nor a PhiConfig field; did you mean 'n_embd'?",
        ),
        ("rope_theta=abc", "--set rope_theta=abc: PhiConfig's rope_theta is a number (default 10000.0)"),
    ],
)
@pytest.mark.parametrize("rule", [[], [PHI2]], ids=["detected", "named"])
def test_a_set_problem_is_reported_as_such_once(cli, tmp_path: Path, given: str, says: str, rule: list[str]) -> None:
    code, _, err = cli("apply", *rule, "--source", good(tmp_path), "--out", tmp_path / "out", "--set", given, "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {says}"), err
    assert not (tmp_path / "out").exists()


def test_apply_says_which_rule_it_chose(cli, tmp_path: Path) -> None:
    src = good(tmp_path)
    code, _, err = cli("apply", "--source", src, "--out", tmp_path / "out")
    assert code == 0, err
    assert f"note: {src}: phi-msft layout: rule phi-2 (" in err and "writes PhiForCausalLM" in err


@pytest.mark.parametrize("given", ["complete", "--tokenizer"])
def test_no_tokenizer_note_when_the_output_has_one(cli, tmp_path: Path, given: str) -> None:
    src = good(tmp_path)
    tiny = ROOT / "rules" / "examples" / "tiny-phi-2"
    extra: list[object] = ["--tokenizer", tiny]
    if given == "complete":  # vocab.json + merges.txt make a tokenizer; tokenizer.json is not missed
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            (src / name).write_bytes((tiny / name).read_bytes())
        extra = []
    code, _, err = cli("apply", PHI2, "--source", src, "--out", tmp_path / "out", *extra)
    assert code == 0 and "not copied" not in err and "no tokenizer files" not in err, err


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]},
        {"dtype": "F32", "shape": [-1, 4], "data_offsets": [16, 0]},
        {"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]},
        {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]},
    ],
    ids=["negative", "negative-reversed", "float", "bool"],
)
def test_dimensions_are_whole_non_negative_numbers(tmp_path: Path, entry: dict[str, object]) -> None:
    safetensors(tmp_path, {"transformer.embd.wte.weight": entry}, b"\0" * 16)
    with pytest.raises(phi_rules.PhiRulesError, match="malformed safetensors entry"):
        phi_rules.plan(phi_rules.load_rules(PHI2), phi_rules.Options(source=phi_rules.SourceOptions(tmp_path / "src")))


def _valid_header(tmp: Path) -> tuple[dict[str, dict[str, object]], bytes]:
    src = good(tmp)
    raw = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.integers(min_value=0, max_value=10_000),
    field=st.sampled_from(["shape", "offset-begin", "offset-end", "dtype", "trailing", "drop"]),
    delta=st.integers(min_value=-6, max_value=6),
)
def test_a_valid_header_changed_in_one_place_fails_cleanly_or_converts_readably(
    tmp_path: Path, which: int, field: str, delta: int
) -> None:
    """Headers that parse this far reach planning and writing (unlike random bytes, which fail at once): the
    result is a PhiRulesError, or an output the safetensors library itself reads whole."""
    from safetensors import safe_open

    folder = tmp_path / "case"
    shutil.rmtree(folder, ignore_errors=True)
    header, data = _valid_header(folder)
    names = sorted(k for k in header if k != "__metadata__")
    name = names[which % len(names)]
    entry = header[name]
    if field == "shape":
        entry["shape"] = [entry["shape"][0] + delta, *entry["shape"][1:]]
    elif field.startswith("offset"):
        entry["data_offsets"][0 if field == "offset-begin" else 1] += delta
    elif field == "dtype":
        entry["dtype"] = ["F16", "BF16", "I64", "F32", "BOOL"][delta % 5]
    elif field == "drop":
        del header[name]
    raw = json.dumps(header).encode()
    tail = b"\0" * max(delta, 0) if field == "trailing" else b""
    (folder / "src" / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data + tail)
    unchecked = variant(folder, "target: {check: false}\n")
    try:
        phi_rules.convert(
            phi_rules.load_rules(unchecked),
            folder / "out",
            phi_rules.Options(source=phi_rules.SourceOptions(folder / "src")),
        )
    except phi_rules.PhiRulesError:
        assert not (folder / "out").exists()
        return
    for f in (folder / "out").glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no iteration
                fh.get_tensor(key)


def test_a_rule_the_user_names_wins_detection(cli, tmp_path: Path) -> None:
    """A user's rule that extends a shipped one fits exactly where the shipped one does: it wins, and says so."""
    src = good(tmp_path)
    mine = rule(tmp_path, f"version: 1\nname: mine\nextends: {PHI2}\n")
    code, out, err = cli("detect", src, "--rules", mine, "--all")
    assert code == 0, out + err
    assert "yes, yours" in out and f"{src}: your rule mine fits and wins over the shipped phi-2" in out
    code, out, _ = cli("detect", src, "--rules", mine, "--json")
    assert code == 0 and [f["rule"] for f in json.loads(out)["fits"] if f["given"]] == ["mine"]


def test_a_bad_tokenizer_is_named_as_such(cli, tmp_path: Path) -> None:
    code, _, err = cli(
        "apply", "--source", good(tmp_path), "--out", tmp_path / "out", "--tokenizer", tmp_path / "nope", "--quiet"
    )
    assert (
        code == 1
        and err.strip()
        == f"error: --tokenizer {tmp_path / 'nope'}: neither a folder nor a hub repository owner/name@revision"
    ), err
