"""The safetensors format on metadata alone, without torch: dtypes, headers, tensor byte spans.

Kept free of heavy imports so that sources can be resolved (and hashed) while torch loads.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from phi_rules.dtypes import itemsize
from phi_rules.errors import PhiRulesError

# safetensors dtype code -> torch dtype name, and the reverse for writing.
ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
ST_CODES = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True, eq=False)
class TensorInfo:
    """One source tensor; ``span`` is its absolute byte range when the file is safetensors."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str
    span: tuple[int, int] | None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def parse_safetensors_header(raw: bytes, file: str, size: int | None = None) -> dict[str, TensorInfo]:
    """Tensor infos from a header's JSON bytes (without the 8-byte length), offsets made absolute."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PhiRulesError(f"{file}: not a safetensors file: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise PhiRulesError(f"{file}: not a safetensors file: header is not a JSON object")
    base = 8 + len(raw)
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = ST_DTYPES[entry["dtype"]]
            shape = tuple(_whole(d) for d in entry["shape"])
            begin, end = (_whole(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise PhiRulesError(f"{file}: malformed safetensors entry for tensor {name!r}") from None
        if end - begin != math.prod(shape) * itemsize(dtype):
            raise PhiRulesError(f"{file}: tensor {name!r}: data_offsets do not match shape {list(shape)} {dtype}")
        if size is not None and base + end > size:
            raise PhiRulesError(f"{file}: tensor {name!r} lies beyond the end of the file (truncated?)")
        tensors[name] = TensorInfo(name, shape, dtype, file, (base + begin, base + end))
        spans.append((begin, end, name))
    _check_contiguous(spans, file, None if size is None else size - base)
    return tensors


def _whole(value: object) -> int:
    """A dimension or offset: a whole, non-negative number, as the safetensors library requires (no 2.5, no
    true, no -1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(value)
    return value


def _check_contiguous(spans: list[tuple[int, int, str]], file: str, data: int | None) -> None:
    """The tensors (relative ``begin, end, name``) fill the data section one after another, from its start to
    its end (``data`` bytes, when known): no gap, no overlap, nothing after; as the safetensors library checks."""
    at, last = 0, "the header"
    for begin, end, name in sorted(spans):
        if begin != at:
            how = "overlap" if begin < at else "leave a gap between them"
            raise PhiRulesError(f"{file}: tensors {last!r} and {name!r} {how} in the file (corrupt header)")
        at, last = end, name
    if data is not None and at != data:
        raise PhiRulesError(f"{file}: the data section holds {data} bytes but its tensors end at {at} (corrupt header)")


def _header_bytes(path: Path) -> tuple[bytes, int]:
    """A local safetensors file's header JSON bytes, and the file's size."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise PhiRulesError(f"{path}: not a safetensors file: too short")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise PhiRulesError(f"{path}: not a safetensors file: header length {n} is impossible")
        return fh.read(n), size


def read_safetensors(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of a local safetensors file, reading only its header."""
    raw, size = _header_bytes(path)
    return parse_safetensors_header(raw, str(path), size)


def read_metadata(path: Path) -> dict[str, str]:
    """A local safetensors file's ``__metadata__`` (where phi-rules records a conversion), empty where it has none."""
    try:
        found = json.loads(_header_bytes(path)[0]).get("__metadata__")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise PhiRulesError(f"{path}: not a safetensors file: header is not a JSON object") from None
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}
