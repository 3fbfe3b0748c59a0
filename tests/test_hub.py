"""Hub sources through the real huggingface_hub client, against tests/hub_server.py on 127.0.0.1.

The client reads its settings at import time, so the CLI runs as a child process with HF_ENDPOINT
and a private HF_HOME.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_phi_rules
from hub_server import Hub
from make_tiny_example import TINY, build
from phi_reference import assert_same_function, random_state, write_checkpoint
from safetensors import safe_open

PHI2 = ROOT / "rules" / "phi-2.yaml"
COMMIT = "834565c23f9b28b96ccbeabe614dd906b6db551a"
MAIN = "c0ffee" + "0" * 34
PHI1_COMMIT = "1" * 40
FINETUNE = "f1" * 20
WEIGHTS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """Original-layout files for phi-2 (the tiny model) and phi-1 (.bin), and a converted main."""
    root = tmp_path_factory.mktemp("hubfiles")
    build(root / "phi-2")
    phi2 = {f.name: f.read_bytes() for f in (root / "phi-2").iterdir() if f.name != "model.safetensors.index.json"}
    phi2["tokenizer.json"] = b'{"version": "1.0", "model": {"type": "BPE"}}'
    converted = root / "converted"
    run = run_phi_rules(
        "apply", PHI2, "--source", root / "phi-2", "--out", converted, "--quiet", "--max-shard-size", "2500KB"
    )
    assert run.returncode == 0, run.stderr
    main = {f.name: f.read_bytes() for f in converted.iterdir()}
    assert set(WEIGHTS) <= set(main)  # like the hub's main today: converted weights under the old names
    state = random_state(TINY, torch.float16, inv_freq=True, seed=2024)
    phi1 = write_checkpoint(root / "phi-1", state, TINY, "bin")
    finetune = {f.name: f.read_bytes() for f in (root / "phi-2").iterdir()}  # with its index, as fine-tunes are
    return {
        "phi-2": phi2,
        "main": main,
        "phi-1": {f.name: f.read_bytes() for f in phi1.iterdir()},
        "finetune": finetune,
    }


@pytest.fixture
def hub(files: dict[str, dict[str, bytes]]) -> Iterator[Hub]:
    server = Hub()
    server.add("microsoft/phi-2", COMMIT, files["phi-2"], branches=("original",))
    server.add("microsoft/phi-2", MAIN, files["main"], branches=("main",))
    server.add("microsoft/phi-1", PHI1_COMMIT, files["phi-1"], branches=("main",))
    server.add("someone/phi-2-finetune", FINETUNE, files["finetune"], branches=("main",))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    return tmp_path / "hf-home"


def phi_rules_cli(hub: Hub | str, hf_home: Path, *args: object, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    base |= {
        "HF_ENDPOINT": hub if isinstance(hub, str) else hub.url,
        "HF_HOME": str(hf_home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    return run_phi_rules(*args, env=base | env)


def weight_gets(hub: Hub) -> list:
    return [e for e in hub.log if e.method == "GET" and e.path.endswith(WEIGHTS)]


def variant(tmp_path: Path, source: str) -> Path:
    """A rule extending phi-2 with another ``source`` section (YAML flow mapping)."""
    path = tmp_path / "variant.yaml"
    path.write_text(f"version: 1\nname: variant\nextends: {PHI2}\nsource: {source}\n")
    return path


def pinned_rule(tmp_path: Path, files: dict[str, bytes]) -> Path:
    pins = ", ".join(f"{{name: {n}, sha256: {hashlib.sha256(files[n]).hexdigest()}}}" for n in WEIGHTS)
    return variant(tmp_path, f"{{files: [{pins}]}}")


def test_apply_downloads_at_pinned_commit_then_works_offline(hub: Hub, hf_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "phi-2"
    run = phi_rules_cli(hub, hf_home, "apply", PHI2, "--out", out)
    assert run.returncode == 0, run.stderr
    state = random_state(TINY, torch.float16, seed=2024)
    assert_same_function(out, state, TINY)
    assert (out / "tokenizer.json").read_bytes() == hub.repos["microsoft/phi-2"].commits[COMMIT]["tokenizer.json"]
    with safe_open(out / "model.safetensors", "pt") as fh:
        meta = fh.metadata()
    assert meta["phi_rules.source_revision"] == COMMIT and meta["phi_rules.source"] == f"microsoft/phi-2@{COMMIT}"
    served = hub.repos["microsoft/phi-2"].commits[COMMIT]
    assert json.loads(meta["phi_rules.source_sha256"]) == {n: hashlib.sha256(served[n]).hexdigest() for n in WEIGHTS}
    assert all(f"/resolve/{COMMIT}/" in e.path for e in hub.log)
    assert (hf_home / "hub" / "models--microsoft--phi-2" / "snapshots" / COMMIT).is_dir()

    hub.stop()  # offline from the cache, the server gone
    for flags, env in (((), {"HF_HUB_OFFLINE": "1"}), (("--offline",), {})):
        again = tmp_path / f"again{len(flags)}"
        run = phi_rules_cli(
            hub.url if hub._server else "http://127.0.0.1:9", hf_home, "apply", PHI2, "--out", again, *flags, **env
        )
        assert run.returncode == 0, run.stderr
        assert_same_function(again, state, TINY)


def test_second_run_is_served_from_cache(hub: Hub, hf_home: Path, tmp_path: Path) -> None:
    assert phi_rules_cli(hub, hf_home, "apply", PHI2, "--out", tmp_path / "a", "--quiet").returncode == 0
    first = len(weight_gets(hub))
    assert first == 2
    assert phi_rules_cli(hub, hf_home, "apply", PHI2, "--out", tmp_path / "b", "--quiet").returncode == 0
    assert len(weight_gets(hub)) == first  # only HEADs the second time


def test_cache_dir_option(hub: Hub, hf_home: Path, tmp_path: Path) -> None:
    cache = tmp_path / "elsewhere"
    run = phi_rules_cli(hub, hf_home, "apply", PHI2, "--cache-dir", cache, "--out", tmp_path / "o", "--quiet")
    assert run.returncode == 0, run.stderr
    assert (cache / "models--microsoft--phi-2" / "snapshots" / COMMIT / WEIGHTS[0]).is_file()
    assert not (hf_home / "hub" / "models--microsoft--phi-2").exists()


def test_branch_revision_resolves_to_its_commit(hub: Hub, hf_home: Path, tmp_path: Path) -> None:
    run = phi_rules_cli(hub, hf_home, "apply", PHI2, "--revision", "original", "--out", tmp_path / "o", "--quiet")
    assert run.returncode == 0, run.stderr
    with safe_open(tmp_path / "o" / "model.safetensors", "pt") as fh:
        assert fh.metadata()["phi_rules.source_revision"] == COMMIT


def test_plan_reads_only_headers(hub: Hub, hf_home: Path) -> None:
    run = phi_rules_cli(hub, hf_home, "plan", PHI2, "--json")
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert len(plan["tensors"]) == 33 and plan["config"]["hidden_size"] == TINY.n_embd
    weights = sum(len(hub.repos["microsoft/phi-2"].commits[COMMIT][n]) for n in WEIGHTS)
    gets = weight_gets(hub)
    assert gets and all(e.range for e in gets)  # range requests only, never a whole weights file
    assert sum(e.sent for e in gets) < weights
    assert not (hf_home / "hub" / "models--microsoft--phi-2" / "snapshots" / COMMIT / WEIGHTS[0]).exists()


def test_plan_of_a_bin_says_it_downloads_in_full(hub: Hub, hf_home: Path) -> None:
    run = phi_rules_cli(hub, hf_home, "plan", ROOT / "rules" / "phi-1.yaml", "--revision", PHI1_COMMIT)
    assert run.returncode == 0, run.stderr
    assert "note: pytorch_model.bin: a pickle has no header to read remotely: downloading it in full" in run.stderr
    assert "model.layers.1.self_attn.v_proj.weight" in run.stdout


def test_unknown_revision_must_be_given(hub: Hub, hf_home: Path, tmp_path: Path) -> None:
    run = phi_rules_cli(hub, hf_home, "apply", ROOT / "rules" / "phi-1.yaml", "--out", tmp_path / "o")
    assert run.returncode == 1 and not hub.log
    assert "source.revision is unknown for microsoft/phi-1" in run.stderr and "--revision" in run.stderr


def test_todays_main_is_already_converted(hub: Hub, hf_home: Path, tmp_path: Path) -> None:
    run = phi_rules_cli(hub, hf_home, "apply", PHI2, "--revision", "main", "--out", tmp_path / "o", "--quiet")
    assert run.returncode == 1
    assert "the source is already in transformers' PhiForCausalLM layout" in run.stderr


def assert_one_line_error(run: subprocess.CompletedProcess[str], out: Path, *pieces: str) -> None:
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, lines
    for piece in pieces:
        assert piece in lines[0], (piece, lines[0])
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_repository_not_found(hub: Hub, hf_home: Path, tmp_path: Path) -> None:
    rule = variant(tmp_path, "{repo: nobody/nothing}")
    run = phi_rules_cli(hub, hf_home, "apply", rule, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(run, tmp_path / "o", "nobody/nothing: repository not found on http://127.0.0.1:")


def test_revision_not_found(hub: Hub, hf_home: Path, tmp_path: Path) -> None:
    run = phi_rules_cli(hub, hf_home, "apply", PHI2, "--revision", "f" * 40, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(run, tmp_path / "o", f"microsoft/phi-2: revision '{'f' * 40}' not found")


def test_file_not_found(hub: Hub, hf_home: Path, tmp_path: Path) -> None:
    rule = variant(tmp_path, f"{{files: [{WEIGHTS[0]}, model-00003-of-00002.safetensors]}}")
    run = phi_rules_cli(hub, hf_home, "apply", rule, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(
        run, tmp_path / "o", f"microsoft/phi-2@{COMMIT}: file 'model-00003-of-00002.safetensors' not found"
    )


def test_offline_and_not_cached_names_the_cache(hub: Hub, hf_home: Path, tmp_path: Path) -> None:
    run = phi_rules_cli(hub, hf_home, "apply", PHI2, "--out", tmp_path / "o", "--quiet", HF_HUB_OFFLINE="1")
    assert_one_line_error(run, tmp_path / "o", f"is not in the cache at {hf_home / 'hub'}", "offline")
    assert not hub.log


def test_truncated_download(hub: Hub, hf_home: Path, tmp_path: Path) -> None:
    hub.fault = "truncate"
    run = phi_rules_cli(hub, hf_home, "apply", PHI2, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(run, tmp_path / "o", "model-00001-of-00002.safetensors arrived truncated")


def test_sha256_mismatch(hub: Hub, hf_home: Path, tmp_path: Path, files: dict[str, dict[str, bytes]]) -> None:
    hub.fault = "corrupt"
    run = phi_rules_cli(
        hub, hf_home, "apply", pinned_rule(tmp_path, files["phi-2"]), "--out", tmp_path / "o", "--quiet"
    )
    expected = hashlib.sha256(files["phi-2"][WEIGHTS[0]]).hexdigest()
    assert_one_line_error(
        run, tmp_path / "o", f"{WEIGHTS[0]}: sha256 mismatch: the rule pins {expected}, the file has "
    )


def test_pinned_sha256_that_matches_converts(
    hub: Hub, hf_home: Path, tmp_path: Path, files: dict[str, dict[str, bytes]]
) -> None:
    rule = pinned_rule(tmp_path, files["phi-2"])
    run = phi_rules_cli(hub, hf_home, "apply", rule, "--out", tmp_path / "o", "--quiet")
    assert run.returncode == 0, run.stderr


def test_connection_dropped_mid_file(hub: Hub, hf_home: Path, tmp_path: Path) -> None:
    hub.fault = "drop"
    run = phi_rules_cli(hub, hf_home, "apply", PHI2, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(run, tmp_path / "o", "download of model-00001-of-00002.safetensors from", "failed")


def test_connection_refused(hf_home: Path, tmp_path: Path) -> None:
    """One look at the endpoint, not the hub client's retries for every file: an answer in seconds."""
    server = Hub().start()
    url = server.url
    server.stop()
    start = time.monotonic()
    run = phi_rules_cli(url, hf_home, "apply", PHI2, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(run, tmp_path / "o", f"cannot reach {url}", "not in the cache", "Connection refused")
    assert time.monotonic() - start < 10


@contextmanager
def silent_endpoint() -> Iterator[str]:
    """A hub that accepts connections and never answers: an unreachable network as a client sees it, with
    no packet leaving this machine."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


HUB_SOURCES = [
    ("apply", "--source", f"someone/phi-2-finetune@{FINETUNE}", "--out", "{out}"),  # a commit: no network at all
    ("apply", "--source", "someone/phi-2-finetune", "--out", "{out}"),  # a branch: one look, then the cache
    ("detect", f"someone/phi-2-finetune@{FINETUNE}"),
    ("detect", "someone/phi-2-finetune"),
    ("plan", "phi-2"),
    ("apply", "phi-2", "--out", "{out}"),
]


def _cache_everything(hub: Hub, hf_home: Path, tmp_path: Path) -> None:
    for args in (("--source", "someone/phi-2-finetune"), ("phi-2",)):
        run = phi_rules_cli(hub, hf_home, "apply", *args, "--out", tmp_path / "warm", "--quiet")
        assert run.returncode == 0, run.stderr
        shutil.rmtree(tmp_path / "warm")


@pytest.mark.parametrize("mode", ["unreachable", "HF_HUB_OFFLINE", "--offline"])
def test_cached_hub_sources_work_without_the_network(hub: Hub, hf_home: Path, tmp_path: Path, mode: str) -> None:
    """With the files cached, every hub-facing command succeeds without the network, in seconds; --offline and
    HF_HUB_OFFLINE send nothing at all."""
    _cache_everything(hub, hf_home, tmp_path)
    sent = len(hub.log)
    with silent_endpoint() as silent:
        for i, command in enumerate(HUB_SOURCES):
            args = [a.format(out=tmp_path / f"out{i}") for a in command]
            endpoint, env, flags = hub.url, {}, ["--offline"] if mode == "--offline" else []
            if mode == "unreachable":
                endpoint = silent
            elif mode == "HF_HUB_OFFLINE":
                env = {"HF_HUB_OFFLINE": "1"}
            start = time.monotonic()
            run = phi_rules_cli(endpoint, hf_home, *args, *flags, **env)
            assert run.returncode == 0, (args, run.stderr)
            assert time.monotonic() - start < 10, args
            assert "Traceback" not in run.stderr and "Retrying" not in run.stderr
            if mode == "unreachable" and command[:3] == ("apply", "--source", "someone/phi-2-finetune"):
                assert f"note: cannot reach {silent} (" in run.stderr and "using the hub cache only" in run.stderr
    if mode != "unreachable":
        assert len(hub.log) == sent  # not one request


def test_unreachable_and_not_cached_is_one_line_in_seconds(hf_home: Path, tmp_path: Path) -> None:
    with silent_endpoint() as silent:
        for args in (("detect", "someone/other@abc"), ("apply", "--source", "someone/other", "--out", tmp_path / "o")):
            start = time.monotonic()
            run = phi_rules_cli(silent, hf_home, *args)
            assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
            assert f"cannot reach {silent}" in run.stderr, run.stderr
            assert time.monotonic() - start < 10


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))

    src = tmp_path / "src"
    src.mkdir()
    torch.save({"transformer.embd.wte.weight": torch.zeros(2), "x": Evil()}, src / "pytorch_model.bin")
    marker.unlink(missing_ok=True)  # torch.save itself does not run it, but be sure
    run = run_phi_rules("apply", PHI2, "--source", src, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(
        run,
        tmp_path / "o",
        "pytorch_model.bin: refused to load: the pickle asks for more than plain tensors",
        "Unsupported global",
    )
    assert not marker.exists()


def test_tokenizer_from_a_hub_repository(hub: Hub, hf_home: Path, tmp_path: Path) -> None:
    src = tmp_path / "finetune"
    build(src)  # weights and config only, as many fine-tunes are shared
    out = tmp_path / "out"
    run = phi_rules_cli(
        hub, hf_home, "apply", PHI2, "--source", src, "--out", out, "--tokenizer", "microsoft/phi-2@original"
    )
    assert run.returncode == 0, run.stderr
    assert f"note: tokenizer files from microsoft/phi-2@{COMMIT}: tokenizer.json" in run.stderr
    assert "warning" not in run.stderr
    assert (out / "tokenizer.json").read_bytes() == hub.repos["microsoft/phi-2"].commits[COMMIT]["tokenizer.json"]
    missing = phi_rules_cli(
        hub, hf_home, "apply", PHI2, "--source", src, "--out", tmp_path / "o2", "--tokenizer", "microsoft/phi-1@main"
    )
    assert missing.returncode == 1 and not (tmp_path / "o2").exists()
    assert missing.stderr.strip() == "error: --tokenizer microsoft/phi-1@main: microsoft/phi-1@main has none of " + (
        "tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, added_tokens.json, special_tokens_map.json, "
        "tokenizer.model, chat_template.jinja"
    )


def test_hub_source_with_no_rule_named(hub: Hub, hf_home: Path, tmp_path: Path) -> None:
    """A community fine-tune on the hub: one command, the layout detected from headers, the branch pinned."""
    out = tmp_path / "out"
    run = phi_rules_cli(hub, hf_home, "plan", "--source", "someone/phi-2-finetune@main", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["rule"] == "phi-2"
    assert all(e.range and e.sent <= 100_001 for e in weight_gets(hub))  # headers only, by range requests
    run = phi_rules_cli(hub, hf_home, "apply", "--source", "someone/phi-2-finetune@main", "--out", out)
    assert run.returncode == 0, run.stderr
    assert f"note: someone/phi-2-finetune@main is commit {FINETUNE}" in run.stderr
    assert_same_function(out, random_state(TINY, torch.float16, seed=2024), TINY)
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert fh.metadata()["phi_rules.source"] == f"someone/phi-2-finetune@{FINETUNE}"
    run = phi_rules_cli(hub, hf_home, "detect", "someone/phi-2-finetune@main")
    assert run.returncode == 0 and "phi-msft layout" in run.stdout
    missing = phi_rules_cli(hub, hf_home, "apply", "--source", "someone/nothing@main", "--out", tmp_path / "o")
    assert missing.returncode == 1 and not (tmp_path / "o").exists()
    assert "someone/nothing: repository not found" in missing.stderr and "Traceback" not in missing.stderr


def _cached_weights(hf_home: Path) -> list[Path]:
    snapshot = hf_home / "hub" / "models--microsoft--phi-2" / "snapshots" / COMMIT
    return [snapshot / name for name in WEIGHTS]


def test_cached_hub_blobs_are_not_hashed_again(
    hub: Hub, hf_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob huggingface_hub stored before this run is named by the hub's sha256: that digest is used."""
    from phi_rules.source import digest

    assert phi_rules_cli(hub, hf_home, "apply", PHI2, "--out", tmp_path / "a", "--quiet").returncode == 0
    monkeypatch.setattr(digest, "STARTED_NS", time.time_ns())  # a later run: the blobs were there before it
    monkeypatch.setenv("PHI_RULES_CACHE", "")  # and no remembered digests

    def hashed(path: Path) -> str:
        raise AssertionError(f"{path} was hashed")

    monkeypatch.setattr(digest, "sha256_file", hashed)
    paths = _cached_weights(hf_home)
    served = hub.repos["microsoft/phi-2"].commits[COMMIT]
    assert digest.Hasher(paths, {}).result() == {n: hashlib.sha256(served[n]).hexdigest() for n in WEIGHTS}


def test_a_cached_blob_changed_on_disk_is_caught(
    hub: Hub, hf_home: Path, tmp_path: Path, files: dict[str, dict[str, bytes]]
) -> None:
    """Bytes rewritten after the download (same size, mtime put back): the blob's ctime is later than its
    link's, so it is hashed, and the pin check stops the conversion before anything is published."""
    rule = pinned_rule(tmp_path, files["phi-2"])
    assert phi_rules_cli(hub, hf_home, "apply", rule, "--out", tmp_path / "a", "--quiet").returncode == 0
    blob = _cached_weights(hf_home)[0].resolve()
    before = blob.stat()
    time.sleep(0.05)
    with blob.open("r+b") as fh:
        fh.seek(before.st_size - 16)
        fh.write(b"\xff" * 16)
    os.utime(blob, ns=(before.st_atime_ns, before.st_mtime_ns))
    hub.stop()
    run = phi_rules_cli("http://127.0.0.1:9", hf_home, "apply", rule, "--out", tmp_path / "b", "--offline", "--quiet")
    expected = hashlib.sha256(files["phi-2"][WEIGHTS[0]]).hexdigest()
    assert_one_line_error(run, tmp_path / "b", f"{WEIGHTS[0]}: sha256 mismatch: the rule pins {expected}")
