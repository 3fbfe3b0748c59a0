"""Cast tensors to another dtype, the same values as ``Tensor.to`` gives, faster where torch is slow.

On the CPU, torch converts float16 to bfloat16 (and back) element by element through float32 at about
1.6 GB/s, against 4 GB/s or more for either half of that trip. Every float16 and bfloat16 value is exact
in float32, so going through a float32 scratch that stays in the cache gives the same bits, 2.5x faster
(a NaN stays a NaN with its sign and payload, where torch's own path makes every NaN 0x7fc0).
"""

from __future__ import annotations

import torch

# Elements at a time: a 128 KiB float32 scratch stays in the L2 cache, and torch runs a copy of at most its
# grain size (32768) on the calling thread; a larger one is split across its OpenMP threads, which then
# spin between chunks and burn another core that the copies and hashes beside the cast need.
CHUNK = 1 << 15
_HALVES = {torch.float16, torch.bfloat16}


def _through_float32(src: torch.Tensor, dtype: torch.dtype) -> bool:
    return src.device.type == "cpu" and {src.dtype, dtype} == _HALVES


def cast_into(src: torch.Tensor, out: torch.Tensor) -> None:
    """Write ``src`` converted to ``out``'s dtype into ``out`` (contiguous, same shape), as ``to`` would."""
    if not _through_float32(src, out.dtype):
        out.copy_(src)
        return
    flat_src, flat_out = src.contiguous().view(-1), out.view(-1)
    scratch = torch.empty(min(CHUNK, flat_src.numel()), dtype=torch.float32)
    for begin in range(0, flat_src.numel(), CHUNK):
        n = min(CHUNK, flat_src.numel() - begin)
        part = scratch[:n]
        part.copy_(flat_src[begin : begin + n])
        flat_out[begin : begin + n].copy_(part)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, the same bits for every value but NaN."""
    if not _through_float32(t, dtype):
        return t.to(dtype)
    out = torch.empty(t.shape, dtype=dtype)
    cast_into(t, out)
    return out
