"""Where the output goes: refuse any ``--out`` that touches the source, lock it, clear what killed runs left,
and publish the finished folder by a rename. Nothing here ever removes a file it did not write.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from phi_rules.errors import PhiRulesError

PARTIAL = ".partial-"
OLD = ".old-"
# What an output folder of ours holds: weights, their index, the configs, and files copied from the source.
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors")
_CONFIGS = ("config.json", "generation_config.json", "adapter_config.json")


def absolute(out: Path) -> Path:
    """``--out`` as an absolute path without ``.`` or ``..`` (``--out .`` has a name and a parent then)."""
    return Path(os.path.abspath(out))


def _forms(path: Path) -> set[Path]:
    """A path as written and as it resolves through symlinks (HF cache snapshots link into blobs/)."""
    return {absolute(path), Path(os.path.realpath(path))}


def refuse_overlap(out: Path, sources: Iterable[Path]) -> None:
    """``--out`` may not be a source, lie inside one, or contain one: replacing it would destroy the source."""
    outs = _forms(out)
    for source in sources:
        for s in _forms(source):
            for o in outs:
                if o == s or o.is_relative_to(s) or s.is_relative_to(o):
                    how = "is" if o == s else ("lies inside" if o.is_relative_to(s) else "contains")
                    raise PhiRulesError(
                        f"{out}: --out {how} the source {source}: writing there would destroy the source "
                        "(with or without --force); choose another --out"
                    )


def _written_by_us(path: Path) -> bool:
    """A safetensors file whose header metadata names a phi-rules rule."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(size, 100_000_000)))
        return "phi_rules.rule" in (header.get("__metadata__") or {})
    except (OSError, ValueError, struct.error, AttributeError):
        return False


def _foreign(folder: Path, extra_names: Iterable[str], parts: Iterable[str] = ()) -> str | None:
    """Why a non-empty folder does not look like an output of ours (None when it does); ``parts``: the
    sub-folders the rule writes (target.parts), each an output of ours too."""
    known = {*_WEIGHTS, *_CONFIGS, *extra_names}
    shards = []
    for entry in folder.iterdir():
        if entry.name in parts and not entry.is_symlink() and entry.is_dir():
            inside = _foreign(entry, extra_names)
            if inside is not None:
                return f"{entry.name}/: {inside}"
            continue
        if entry.is_symlink() or not entry.is_file():
            return f"it holds {entry.name!r}, which is not a file phi-rules writes"
        is_shard = entry.name.startswith("model-") and entry.name.endswith(".safetensors")
        if entry.name not in known and not is_shard:
            return f"it holds {entry.name!r}, which phi-rules does not write"
        if entry.suffix == ".safetensors":
            shards.append(entry)
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        return "it has no config.json"
    if shards and not any(_written_by_us(s) for s in shards):
        return "its weights were not written by phi-rules"
    return None


def prepare(out: Path, force: bool, extra_names: Iterable[str], parts: Iterable[str] = ()) -> None:
    """Refuse a file, or a non-empty folder without --force; --force replaces only a previous output of ours
    (with its ``parts`` sub-folders)."""
    if out.exists() and not out.is_dir():
        raise PhiRulesError(f"{out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise PhiRulesError(f"{out}: folder exists and is not empty (use --force to replace a previous output)")
    why = _foreign(out, extra_names, set(parts))
    if why is not None:
        raise PhiRulesError(
            f"{out}: --force replaces only a previous phi-rules output, and this folder is not one ({why}); "
            "remove it yourself or choose another --out"
        )


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """One apply at a time per --out: a second one fails at once instead of racing the first's rename.

    ``filelock`` (which huggingface_hub brings) locks the same way on Linux, macOS and Windows."""
    from filelock import FileLock, Timeout

    path = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path, timeout=0)
        lock.acquire()
    except Timeout:
        raise PhiRulesError(f"{out}: another phi-rules apply is writing this folder right now") from None
    except OSError as exc:
        raise PhiRulesError(f"{exc.filename or out.parent}: cannot write the output here: {exc.strerror}") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # still held: a run that opened it meanwhile fails to lock and stops
            path.unlink()
        lock.release()


def clear_stale(out: Path, note: Callable[[str], None]) -> None:
    """Remove what killed runs left beside ``out``; called with the lock held, so no live run owns them."""
    stale = [p for p in out.parent.glob(f".{out.name}.*") if p.is_dir() and (PARTIAL in p.name or OLD in p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        note(f"removed {len(stale)} unfinished folder(s) that killed runs left beside {out}")


def temporary(out: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}", dir=out.parent))


def commit(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old one (with --force) is removed only afterwards."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}{OLD}", dir=out.parent))
        os.rename(out, old / out.name)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
