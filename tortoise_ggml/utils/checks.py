"""Checks of the arrays and seeds callers hand in, written once: each raises TypeError/ValueError naming the
argument, before a bad value reaches a graph (ggml would assert, or read past a table)."""
from __future__ import annotations

import numpy as np


def as_generator(seed) -> np.random.Generator:
    """A numpy Generator from a seed (int, None) or a Generator itself (shared, so one stream feeds a whole run)."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def floats(a, name: str, ndim: int | tuple[int, ...] | None = None, finite: bool = True,
           allow_empty: bool = False) -> np.ndarray:
    """``a`` as a contiguous float32 array: a float dtype, ``ndim`` dimensions (one of them, given a tuple),
    not empty and (``finite``) free of NaN and infinities."""
    arr = np.asarray(a)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be floating point (floats), got dtype {arr.dtype}")
    if ndim is not None and arr.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if finite and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return np.ascontiguousarray(arr, dtype=np.float32)


def ids(a, name: str, limit: int, ndim: int | None = None) -> np.ndarray:
    """Integer ids as int32, checked against the ``limit`` rows of the table they index."""
    arr = np.asarray(a)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integer ids, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= limit):
        raise ValueError(f"{name} must lie in [0, {limit}), got values in [{arr.min()}, {arr.max()}]")
    return np.ascontiguousarray(arr, dtype=np.int32)


def positive_int(value, name: str) -> int:
    """``value`` as an int >= 1 (bools refused), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
    return int(value)


__all__ = ["as_generator", "floats", "ids", "positive_int"]
