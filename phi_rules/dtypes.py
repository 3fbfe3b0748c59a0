"""Tensor dtypes by their torch names, without torch: sizes in bytes, and which are floating point."""

from __future__ import annotations

from phi_rules.errors import PhiRulesError

ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16"}


def itemsize(name: str) -> int:
    try:
        return ITEMSIZE[name]
    except KeyError:
        raise PhiRulesError(f"unsupported dtype {name!r}") from None
