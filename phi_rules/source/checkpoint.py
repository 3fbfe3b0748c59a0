"""Read source checkpoints: names, shapes and dtypes from metadata alone, tensor bytes on demand.

Safetensors headers come from :mod:`phi_rules.source.header`, so planning reads no tensor
bytes. ``.bin`` files are opened with ``torch.load(weights_only=True, mmap=True)``: a pickle that
wants to run code is refused.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from phi_rules.errors import PhiRulesError
from phi_rules.source.header import TensorInfo, read_safetensors

if TYPE_CHECKING:  # torch is imported only to read .bin files and tensor bytes, never to plan
    import torch


def torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise PhiRulesError(f"unknown dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _looks_like_torch_save(path: Path) -> None:
    """``torch.save`` writes a zip archive (or, before torch 1.6, a pickle): anything else is no weights file,
    and the unpickler's own error for it (``KeyError: 101``) would say nothing."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise PhiRulesError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise PhiRulesError(
            f"{path}: not a weights file (neither safetensors nor a PyTorch .bin: it starts with {head!r}); "
            "give the checkpoint's folder or its .safetensors/.bin file"
        )


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict, memory-mapped where the format allows, never running pickled code."""
    _looks_like_torch_save(path)
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (pre-zip) files cannot be memory-mapped
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()]
        hostile = next((line for line in lines if "global" in line.lower() and "GLOBAL" in line.upper()), None)
        if hostile is None:  # the weights-only unpickler met bytes that are no pickle at all
            detail = next((line for line in lines if line.startswith("Unsupported")), type(exc).__name__)
            raise PhiRulesError(f"{path}: cannot read as a PyTorch weights file: {detail}") from None
        raise PhiRulesError(
            f"{path}: refused to load: the pickle asks for more than plain tensors, which could run "
            f"code (weights_only=True rejected it: {hostile.removeprefix('WeightsUnpickler error: ')})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise PhiRulesError(f"{path}: cannot read as a PyTorch weights file: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PhiRulesError(f"{path}: not a flat state dict of tensors")
    return state


def read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``; returns the bytes read, fewer only at the end of the file (one read
    call returns at most 2 GiB on Linux)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


class Checkpoint:
    """All tensors of a set of weight files, with lazy access to each tensor's data."""

    def __init__(self, files: Iterable[Path], prefixes: Mapping[Path, str] | None = None) -> None:
        """``prefixes``: safetensors files whose tensor names get a prefix (an adapter folder read with its model)."""
        self.tensors: dict[str, TensorInfo] = {}
        self._bins: dict[str, dict[str, torch.Tensor]] = {}
        self._fds: dict[str, int] = {}
        for path in files:
            found = self._read(Path(path))
            prefix = (prefixes or {}).get(Path(path), "")
            if prefix:
                found = {prefix + name: replace(info, name=prefix + name) for name, info in found.items()}
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
        import torch

        begin, end = info.span
        flat = torch.empty(end - begin, dtype=torch.uint8)  # unlike a bytearray, not zero-filled first
        if len(flat) and read_into(self.fd(info.file), flat.numpy().data, begin) != len(flat):
            raise PhiRulesError(f"{info.file}: short read for tensor {info.name!r} (file truncated?)")
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
