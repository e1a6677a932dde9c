"""ggml tensor types and their numpy counterparts."""
from __future__ import annotations

import enum

import numpy as np

from .raw import lib


def _ggml_types() -> dict[str, int]:
    names = {}
    for attr in dir(lib):
        if attr.startswith("GGML_TYPE_") and attr != "GGML_TYPE_COUNT":
            names[attr[len("GGML_TYPE_"):]] = getattr(lib, attr)
    return names


Type = enum.IntEnum("Type", _ggml_types())
Type.__doc__ = "enum ggml_type"
TYPE_COUNT = lib.GGML_TYPE_COUNT

# Element types with a plain numpy dtype. BF16 has none: it is exchanged as float32 (rounded to nearest even).
NUMPY_DTYPES = {
    Type.F32: np.dtype(np.float32),
    Type.F16: np.dtype(np.float16),
    Type.F64: np.dtype(np.float64),
    Type.I8: np.dtype(np.int8),
    Type.I16: np.dtype(np.int16),
    Type.I32: np.dtype(np.int32),
    Type.I64: np.dtype(np.int64),
}


def as_type(t) -> Type:
    """Type from a Type, int, name ('f16', 'q8_0') or numpy dtype."""
    if isinstance(t, Type):
        return t
    if isinstance(t, str):
        try:
            return Type[t.upper()]
        except KeyError:
            raise ValueError(f"unknown ggml type {t!r}") from None
    if isinstance(t, (int, np.integer)):
        return Type(int(t))
    dt = np.dtype(t)
    for k, v in NUMPY_DTYPES.items():
        if v == dt:
            return k
    raise ValueError(f"no ggml type for numpy dtype {dt}")


def is_quantized(t) -> bool:
    return bool(lib.ggml_is_quantized(int(t)))


def type_name(t) -> str:
    from .raw import string
    return string(lib.ggml_type_name(int(t)))


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even, NaN kept quiet), as ggml_fp32_to_bf16 does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(nan, ((u >> 16) | 64).astype(np.uint16), r)


def bf16_bits_to_float32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
