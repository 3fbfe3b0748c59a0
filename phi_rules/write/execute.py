"""Produce output tensors one at a time: byte ranges copied file to file where the bytes do not
change, everything else read, moved to the device, run through its ops and moved back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch

from phi_rules.cast import cast
from phi_rules.dtypes import itemsize
from phi_rules.errors import PhiRulesError
from phi_rules.language.ops import OpError
from phi_rules.planning.planner import Computation, Pick, PlannedTensor, Value
from phi_rules.source.checkpoint import Checkpoint, torch_dtype
from phi_rules.source.header import TensorInfo


class Executor:
    """Materializes planned tensors; a transform's outputs are computed once and kept until all are used."""

    def __init__(self, checkpoint: Checkpoint, tensors: list[PlannedTensor], device: torch.device) -> None:
        self.checkpoint, self.device = checkpoint, device
        self.cache: dict[Computation, list[torch.Tensor]] = {}
        self.uses: Counter[Computation] = Counter()
        counted: set[Computation] = set()
        for t in tensors:
            for pick in self._picks(t.value, counted):
                self.uses[pick.comp] += 1

    def _picks(self, value: Value, counted: set[Computation]) -> Iterator[Pick]:
        """Every read of a computation's output: one per output that picks it, and one per computation that
        takes it as an input, counted once however many outputs that computation feeds (it runs once)."""
        if isinstance(value, Pick):
            yield value
            if value.comp not in counted:
                counted.add(value.comp)
                for inp in value.comp.inputs:
                    yield from self._picks(inp, counted)

    def _value(self, value: Value) -> torch.Tensor:
        if isinstance(value, TensorInfo):
            return self.checkpoint.load(value).to(self.device)
        comp = value.comp
        if comp not in self.cache:
            tensors = [self._value(inp) for inp in comp.inputs]
            try:
                for op in comp.ops:
                    tensors = op.run(tensors)
            except OpError as exc:  # what only the bytes show (take_one's copies differ): the conversion stops
                raise PhiRulesError(f"step {comp.step!r}: {exc}") from None
            self.cache[comp] = [t.to(self.device) for t in tensors]  # zeros for an absent input start on the CPU
        result = self.cache[comp][value.index]
        self.uses[comp] -= 1
        if self.uses[comp] <= 0:
            del self.cache[comp]
        return result

    def tensor(self, planned: PlannedTensor) -> torch.Tensor:
        """The output tensor on the CPU, in its written dtype, contiguous and owning its storage."""
        t = cast(self._value(planned.value), torch_dtype(planned.dtype)).contiguous().cpu()
        if t.untyped_storage().nbytes() != t.numel() * itemsize(planned.dtype):
            t = t.clone()  # a view into a larger tensor (split output): keep only its own bytes
        return t
