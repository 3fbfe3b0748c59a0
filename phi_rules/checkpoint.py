"""Read source checkpoints: tensor names, shapes and dtypes from metadata alone, bytes on demand.

Safetensors headers are parsed here (8-byte length + JSON) so that planning reads no tensor bytes
and so that each tensor's absolute byte span is known for file-to-file copies. ``.bin`` files are
opened with ``torch.load(weights_only=True, mmap=True)``: a pickle that wants to run code is refused.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

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


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise PhiRulesError(f"unknown dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def itemsize(name: str) -> int:
    return torch_dtype(name).itemsize


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
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = ST_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise PhiRulesError(f"{file}: malformed safetensors entry for tensor {name!r}") from None
        if end - begin != math.prod(shape) * itemsize(dtype) or begin < 0:
            raise PhiRulesError(f"{file}: tensor {name!r}: data_offsets do not match shape {list(shape)} {dtype}")
        if size is not None and base + end > size:
            raise PhiRulesError(f"{file}: tensor {name!r} lies beyond the end of the file (truncated?)")
        tensors[name] = TensorInfo(name, shape, dtype, file, (base + begin, base + end))
    return tensors


def read_safetensors(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of a local safetensors file, reading only its header."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise PhiRulesError(f"{path}: not a safetensors file: too short")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise PhiRulesError(f"{path}: not a safetensors file: header length {n} is impossible")
        return parse_safetensors_header(fh.read(n), str(path), size)


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict, memory-mapped where the format allows, never running pickled code."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (pre-zip) files cannot be memory-mapped
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error: ([^\n]*)", re.sub(r"\x1b\[[0-9;]*m", "", str(exc)))
        first = found.group(1).strip() if found else type(exc).__name__
        raise PhiRulesError(
            f"{path}: refused to load: the pickle asks for more than plain tensors, which could run "
            f"code (weights_only=True rejected it: {first})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise PhiRulesError(f"{path}: cannot read as a PyTorch weights file: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PhiRulesError(f"{path}: not a flat state dict of tensors")
    return state


class Checkpoint:
    """All tensors of a set of weight files, with lazy access to each tensor's data."""

    def __init__(self, files: Iterable[Path]) -> None:
        self.tensors: dict[str, TensorInfo] = {}
        self._bins: dict[str, dict[str, torch.Tensor]] = {}
        self._fds: dict[str, int] = {}
        for path in files:
            found = self._read(Path(path))
            for name, info in found.items():
                if name in self.tensors:
                    raise PhiRulesError(f"tensor {name!r} is in both {self.tensors[name].file} and {info.file}")
                self.tensors[name] = info

    def _read(self, path: Path) -> dict[str, TensorInfo]:
        if path.suffix == ".safetensors":
            found = read_safetensors(path)
            return dict(sorted(found.items(), key=lambda kv: kv[1].span or (0, 0)))
        state = load_bin(path)
        self._bins[str(path)] = state
        return {k: TensorInfo(k, tuple(v.shape), dtype_name(v.dtype), str(path), None) for k, v in state.items()}

    def fd(self, file: str) -> int:
        """An open read-only descriptor for a source file (kept for the checkpoint's lifetime)."""
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def load(self, info: TensorInfo) -> torch.Tensor:
        """The tensor's data on the CPU; safetensors bytes are read with pread, not mapped, to keep RSS low."""
        if info.span is None:
            return self._bins[info.file][info.name]
        begin, end = info.span
        buf = bytearray(end - begin)
        got = os.preadv(self.fd(info.file), [buf], begin) if buf else 0
        if got != len(buf):
            raise PhiRulesError(f"{info.file}: short read for tensor {info.name!r} (file truncated?)")
        flat = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        return flat.view(torch_dtype(info.dtype)).reshape(info.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bins.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
