"""Move source bytes into the output without materialising tensors.

Where the plan shows an output's elements are source bytes in order (see :mod:`segments`), they stream:
copied file to file by the kernel when the dtype stays, else read, cast and written in chunks that
of 16 MB, one cast while the one before is written. Memory stays three such buffers, whatever the
tensor sizes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from phi_rules.dtypes import itemsize
from phi_rules.errors import PhiRulesError
from phi_rules.source.checkpoint import read_into

if TYPE_CHECKING:
    import torch

CHUNK = 64 * 1024 * 1024  # one kernel copy call: few returns, so the GIL is rarely waited for
CAST_CHUNK = 16 * 1024 * 1024  # source bytes read, cast and written at a time by one core
WRITE_CHUNK = 256 * 1024
Progress = Callable[[int], None]
FdOf = Callable[[str], int]
T = TypeVar("T")
R = TypeVar("R")


class Run(NamedTuple):
    """Source bytes ``[begin, end)`` of ``file``, written into shard ``shard`` from offset ``at``, cast from
    ``dtype`` to ``to`` when those differ."""

    file: str
    begin: int
    end: int
    shard: int
    at: int
    dtype: str
    to: str

    @property
    def out_bytes(self) -> int:
        return (self.end - self.begin) // itemsize(self.dtype) * itemsize(self.to)


def join(runs: Iterable[Run]) -> list[Run]:
    """Adjacent runs as one: a rename-only plan is one run per shard, not one per tensor."""
    out: list[Run] = []
    for run in runs:
        last = out[-1] if out else None
        follows = last is not None and last.end == run.begin and last.at + last.out_bytes == run.at
        if last is not None and follows and last._replace(begin=run.begin, end=run.end, at=run.at) == run:
            out[-1] = last._replace(end=run.end)
        else:
            out.append(run)
    return out


def _libc_fallocate() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    fn = getattr(ctypes.CDLL(None, use_errno=True), "fallocate", None)
    if fn is not None:
        fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return fn


_FALLOCATE = _libc_fallocate()
_OUT_OF_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def reserve(fd: int, size: int, name: str) -> None:
    """Give a new output file its blocks before a byte is copied: ext4 then allocates each shard once, not
    block by block as the copy lands (a third less kernel time for the copy here), and a disk without room
    fails now, before anything is written. Linux's own fallocate(2): glibc's posix_fallocate would write
    zeros where a file system lacks it; there, and off Linux, nothing is reserved."""
    if _FALLOCATE is None or size <= 0 or _FALLOCATE(fd, 0, 0, size) == 0:
        return
    code = ctypes.get_errno()
    if code in _OUT_OF_ROOM:
        raise OSError(code, os.strerror(code), name)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write in ``WRITE_CHUNK`` pieces: a larger write makes the kernel (6.x, ext4) give the page cache large
    folios, which cost 5-10x as much to fill here as the small pages that cp's kernel copy gets."""
    while data:
        n = os.pwrite(fd, data[:WRITE_CHUNK], offset)
        data, offset = data[n:], offset + n


def copy(runs: list[Run], src: FdOf, dst: list[int], progress: Progress) -> None:
    """Copy bytes file to file in the kernel where it can (no pass through user space); macOS and Windows
    have no ``copy_file_range`` and take the plain reads and writes."""
    kernel_copy = getattr(os, "copy_file_range", None)
    for run in runs:
        begin, end, at = run.begin, run.end, run.at
        while begin < end:
            try:
                n = kernel_copy(src(run.file), dst[run.shard], min(end - begin, CHUNK), begin, at) if kernel_copy else 0
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                n = 0
            if n == 0:  # not supported here, or at EOF: fall back to plain reads and writes
                chunk = os.pread(src(run.file), min(end - begin, CHUNK), begin)
                if not chunk:
                    raise PhiRulesError(f"{run.file}: source file ended early (truncated?)")
                pwrite_all(dst[run.shard], memoryview(chunk), at)
                n = len(chunk)
            begin, at = begin + n, at + n
            progress(n)


def cast(runs: list[Run], src: FdOf, dst: list[int], progress: Progress) -> None:
    """Each piece read and cast in a worker thread while the one before it is written."""
    caster = _Caster(src)

    def write(piece: Run, data: memoryview) -> None:
        pwrite_all(dst[piece.shard], data, piece.at)
        progress(len(data))

    pipelined([piece for run in runs for piece in _pieces(run)], caster.run, write)


def pipelined(items: Sequence[T], compute: Callable[[int, T], R], write: Callable[[T, R], None]) -> None:
    """``compute(i, item)`` in a worker thread while the calling thread writes the item before: torch's ops,
    reads and writes release the GIL, so the two overlap, and one thread writing keeps the file's lock
    uncontended. At most two results are alive at once: ``compute`` may reuse two buffers by ``i % 2``."""
    pending: deque[tuple[T, Future[R]]] = deque()

    def write_oldest() -> None:
        item, future = pending.popleft()
        write(item, future.result())

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="phi-rules-compute") as pool:
        try:
            for i, item in enumerate(items):
                pending.append((item, pool.submit(compute, i, item)))
                if len(pending) > 1:
                    write_oldest()
            while pending:
                write_oldest()
        finally:  # an error or Ctrl-C: the one queued behind the running one never starts
            for _, future in pending:
                future.cancel()


def _pieces(run: Run) -> list[Run]:
    """The run cut into pieces of at most ``CAST_CHUNK`` source bytes, each a whole number of elements."""
    step = CAST_CHUNK - CAST_CHUNK % itemsize(run.dtype)
    ratio = (itemsize(run.to), itemsize(run.dtype))
    return [
        run._replace(begin=b, end=min(b + step, run.end), at=run.at + (b - run.begin) // ratio[1] * ratio[0])
        for b in range(run.begin, run.end, step)
    ]


class _Caster:
    """Reads and casts one piece at a time into reused buffers: one for the source bytes, two for the output
    (one being written while the next is cast)."""

    def __init__(self, src: FdOf) -> None:
        self.src = src
        self.buffers: dict[str, torch.Tensor] = {}

    def run(self, i: int, piece: Run) -> memoryview:
        from phi_rules.cast import cast_into
        from phi_rules.source.checkpoint import torch_dtype

        inp = self._buffer("in", piece.end - piece.begin)
        out = self._buffer(f"out{i % 2}", piece.out_bytes)
        if read_into(self.src(piece.file), inp.numpy().data, piece.begin) != len(inp):
            raise PhiRulesError(f"{piece.file}: source file ended early (truncated?)")
        cast_into(inp.view(torch_dtype(piece.dtype)), out.view(torch_dtype(piece.to)))
        return out.numpy().data

    def _buffer(self, name: str, size: int) -> torch.Tensor:
        """Buffer ``name``, grown to ``size`` bytes if needed: allocated once, not zero-filled."""
        import torch

        buf = self.buffers.get(name)
        if buf is None or len(buf) < size:
            buf = self.buffers[name] = torch.empty(size, dtype=torch.uint8)
        return buf[:size]
