"""sha256 of the source files, for the output's metadata and for the rule's pins.

Hashing a 5.6 GB checkpoint costs as much CPU as copying it, so the files are hashed in background
threads (one per file, up to one less than the core count) while the bytes move, and a digest is remembered by the
file's identity: path, device, inode, size, modification and change time. The change time (ctime)
cannot be set from user space, so a file rewritten in any way, even with its mtime restored, gets a
new identity and is hashed again. ``PHI_RULES_CACHE`` names the folder (default
``$XDG_CACHE_HOME/phi-rules``, else ``~/.cache/phi-rules``); set it empty to hash every run. A file the
Hugging Face cache holds as an LFS blob is not hashed at all while it is unchanged since its download:
the blob is named by the sha256 the hub computed (see :func:`vouched_by_hub`).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from phi_rules.errors import PhiRulesError

_HEX = re.compile(r"[0-9a-f]{64}")
STARTED_NS = time.time_ns()  # blobs linked into the hub cache after this were downloaded by this run
FRESH_S = 2.0  # a file changed this recently may change again within the same timestamp tick: not remembered


def cache_folder() -> Path | None:
    """Where digests are remembered, or None when ``PHI_RULES_CACHE`` is set empty."""
    if "PHI_RULES_CACHE" in os.environ:
        return Path(os.environ["PHI_RULES_CACHE"]) if os.environ["PHI_RULES_CACHE"] else None
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "phi-rules"
    try:
        return Path.home() / ".cache" / "phi-rules"
    except RuntimeError:  # no home folder to be found: hash every run
        return None


def _identity(path: Path) -> tuple[str, os.stat_result]:
    st = os.stat(path)
    fields = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return hashlib.sha256("\0".join(map(str, fields)).encode()).hexdigest(), st


def _entry(key: str) -> Path | None:
    folder = cache_folder()
    return None if folder is None else folder / "sha256" / key


def remembered(path: Path) -> str | None:
    """The file's sha256 from an earlier run, if the file has not changed since."""
    entry = _entry(_identity(path)[0])
    try:
        digest = entry.read_text().strip() if entry is not None else ""
    except (OSError, UnicodeDecodeError):
        return None
    return digest if _HEX.fullmatch(digest) else None


def write_atomically(entry: Path, text: str) -> None:
    """Best effort: a read-only or full cache folder only means working it out again next time."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, entry)
    except OSError:
        return


def sha256_file(path: Path) -> str:
    """Hash the file's bytes, and remember the digest when the file stayed the same while it was read."""
    key, before = _identity(path)
    h = hashlib.sha256()
    buf = bytearray(16 * 1024 * 1024)  # one buffer, reused: no fresh allocation per chunk
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])  # releases the GIL: files hash in parallel
    digest = h.hexdigest()
    entry = _entry(key)
    settled = time.time() - before.st_ctime_ns / 1e9 > FRESH_S
    if entry is not None and settled and _identity(path)[0] == key:
        write_atomically(entry, digest + "\n")
    return digest


def vouched_by_hub(path: Path) -> str | None:
    """The sha256 huggingface_hub named a cached file's blob by, where the blob is unchanged since download.

    An LFS file in the hub cache is a link ``snapshots/REV/NAME -> ../../blobs/SHA256``, made after the blob
    was written in full. A blob written to afterwards has a change time (ctime, which user space cannot
    set) later than its link's; such a blob, or any other file, is hashed instead. So is a blob downloaded
    by this run: its bytes were just read from the network, which is all a mirror vouches for."""
    try:
        if not path.is_symlink():
            return None
        target = Path(os.path.realpath(path))
        if target.parent.name != "blobs" or not _HEX.fullmatch(target.name):
            return None
        linked = os.lstat(path).st_mtime_ns
        return target.name if os.stat(target).st_ctime_ns <= linked < STARTED_NS else None
    except OSError:
        return None


def _known(path: Path) -> Future[str] | None:
    digest = vouched_by_hub(path) or remembered(path)
    if digest is None:
        return None
    done: Future[str] = Future()
    done.set_result(digest)
    return done


class Hasher:
    """The source files' sha256 computed in the background; pins are checked when the digests are asked for.

    ``files``: every weight file when the output records them, else only the pinned ones.
    """

    def __init__(self, files: list[Path], pins: dict[Path, str]) -> None:
        for path, expected in pins.items():
            if path not in files:  # config and extra files: small, checked now
                _check(path, expected, sha256_file(path))
        known = {p: _known(p) for p in files}
        todo = [p for p, f in known.items() if f is None]
        # One core is left to the copy (kernel time) and the rest of the run: on 2 cores a second hashing
        # thread only takes the copy's core, as the floor (cp beside one sha256 process) shows.
        workers = max(1, min(len(todo), (os.cpu_count() or 1) - 1))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="phi-rules-sha256")
        self._jobs = {p: f or self._pool.submit(sha256_file, p) for p, f in known.items()}
        self._pins = pins

    def result(self) -> dict[str, str]:
        """Every file's sha256 by file name; a pinned file that differs from its pin is an error."""
        try:
            digests = {p.name: f.result() for p, f in self._jobs.items()}
        finally:
            self._pool.shutdown()
        problem = self.mismatch()
        if problem is not None:
            raise problem
        return digests

    def mismatch(self) -> PhiRulesError | None:
        """The first pinned weight file whose bytes differ from its pin: the cause of any error they led to
        (a corrupted header fails to parse before the file's hash is done)."""
        for path, pin in self._pins.items():
            job = self._jobs.get(path)
            if job is None or job.cancelled() or job.exception() is not None:
                continue
            if job.result() != pin:
                return _mismatch(path, pin, job.result())
        return None

    def cancel(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _mismatch(path: Path, expected: str, actual: str) -> PhiRulesError:
    return PhiRulesError(f"{path}: sha256 mismatch: the rule pins {expected}, the file has {actual}")


def _check(path: Path, expected: str, actual: str) -> None:
    if actual != expected:
        raise _mismatch(path, expected, actual)
