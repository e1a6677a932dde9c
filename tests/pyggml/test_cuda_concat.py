"""Conformance of the CUDA concat (vendor/ggml/patches/0001-cuda-concat-any-size.patch) with the CPU backend.

Every case concatenates two views of random data, bit for bit: each dim 0..3, element sizes 1/2/4/8 bytes
(I8, F16, BF16, F32, I32, I64), inputs that are contiguous, permuted, padded rows (odd strides, odd offsets) or
every-other-row views, and shapes that upstream's kernel could not launch (ne2 or ne3 > 65535) or ran one block per
row (tiny ne0), plus a long ne0. The CUDA comparison needs a GPU build and device; without one it is skipped, and
the same cases still check the CPU side against numpy so the harness itself is known to be right.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import pyggml as pg

UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
PERMUTATION = (2, 0, 3, 1)  # ggml_permute axes: source dim i lands at result dim PERMUTATION[i]


@dataclass(frozen=True)
class Case:
    type: str
    dim: int
    ne_a: tuple[int, int, int, int]   # ne of the concat's first operand (the view, not its storage)
    ne_b: tuple[int, int, int, int]
    layout_a: str = "cont"            # cont | perm | pad | skip: how the operand sits in its storage
    layout_b: str = "cont"

    def __str__(self) -> str:
        return (f"{self.type}-dim{self.dim}-{'x'.join(map(str, self.ne_a))}+{'x'.join(map(str, self.ne_b))}-"
                f"{self.layout_a}-{self.layout_b}")


def _grow(ne, dim, by):
    ne = list(ne)
    ne[dim] += by
    return tuple(ne)


def _cases() -> list[Case]:
    out = []
    for t in ("f32", "f16", "bf16", "i32"):
        for dim in range(4):
            a = (5, 3, 2, 2)
            out.append(Case(t, dim, a, _grow(a, dim, -2 if a[dim] > 2 else 1)))
            # rows of 8 elements: the kernel may copy them as wider words
            a = (8, 4, 3, 2)
            out.append(Case(t, dim, a, _grow(a, dim, 4), "cont", "skip"))
            a = (6, 5, 3, 2)
            out.append(Case(t, dim, a, _grow(a, dim, 1), "perm", "pad"))
            out.append(Case(t, dim, a, _grow(a, dim, 2), "pad", "perm"))
    for t in ("i8", "i64"):
        for dim in range(4):
            a = (7, 3, 2, 3)
            out.append(Case(t, dim, a, _grow(a, dim, 1), "cont", "pad"))
            out.append(Case(t, dim, a, _grow(a, dim, 2), "perm", "skip"))
    # upstream launched a (ne1, ne2, ne3) grid for non-contiguous inputs: ne2 or ne3 > 65535 could not launch
    out.append(Case("f32", 0, (3, 2, 70000, 1), (2, 2, 70000, 1), "pad", "cont"))
    out.append(Case("f16", 2, (3, 2, 70000, 1), (3, 2, 3, 1), "perm", "cont"))
    out.append(Case("i32", 1, (2, 1, 2, 70001), (2, 2, 2, 70001), "cont", "perm"))
    out.append(Case("bf16", 3, (1, 2, 3, 40000), (1, 2, 3, 30001), "skip", "cont"))
    # aligned contiguous rows that the kernel may copy as 16-byte words
    out.append(Case("f16", 0, (16, 4, 3, 2), (8, 4, 3, 2)))
    out.append(Case("f32", 2, (12, 4, 3, 2), (12, 4, 1, 2)))
    # long rows
    out.append(Case("f32", 0, (300001, 2, 1, 1), (7, 2, 1, 1)))
    out.append(Case("f16", 1, (200003, 2, 1, 1), (200003, 1, 1, 1), "pad", "cont"))
    # contiguous dim 3 (two plain copies) and an empty operand
    out.append(Case("f32", 3, (4, 3, 2, 2), (4, 3, 2, 1)))
    out.append(Case("f32", 1, (4, 0, 2, 2), (4, 3, 2, 2)))
    return out


CASES = _cases()


def _storage_ne(case_ne, layout):
    """ne of the tensor that holds an operand laid out as ``layout``."""
    if layout == "perm":
        return tuple(case_ne[PERMUTATION[i]] for i in range(4))
    if layout == "pad":
        return (case_ne[0] + 3,) + tuple(case_ne[1:])
    if layout == "skip":
        return (case_ne[0], 2 * case_ne[1]) + tuple(case_ne[2:])
    return tuple(case_ne)


def _operand(ctx: pg.Context, storage: pg.Tensor, ne, layout) -> pg.Tensor:
    if layout == "perm":
        return ctx.permute(storage, *PERMUTATION)
    if layout == "pad":
        # rows of ne0 elements starting one element in: odd row stride, unaligned start
        es = storage.nb[0]
        return ctx.view(storage, ne, storage.nb[1:], offset=es)
    if layout == "skip":
        return ctx.view(storage, ne, (2 * storage.nb[1],) + storage.nb[2:])
    return storage


def _random(ne, type_name, rng) -> np.ndarray:
    shape = tuple(reversed(ne))
    if type_name == "f32":
        return rng.standard_normal(shape).astype(np.float32)
    if type_name == "f16":
        return rng.standard_normal(shape).astype(np.float16)
    if type_name == "bf16":
        # raw bit patterns (pyggml writes uint16 into BF16 unchanged); exponent kept away from NaN/Inf
        return (rng.integers(0, 1 << 16, shape, dtype=np.uint32) & 0xBFFF).astype(np.uint16)
    dtype = {"i8": np.int8, "i32": np.int32, "i64": np.int64}[type_name]
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def _bits(arr: np.ndarray) -> np.ndarray:
    return arr.view(UNSIGNED[arr.dtype.itemsize])


def _as_numpy_view(storage_bits: np.ndarray, t: pg.Tensor) -> np.ndarray:
    """The elements ggml reads for view ``t`` of ``storage_bits`` (same ne, nb and offset)."""
    es = storage_bits.itemsize
    flat = storage_bits.reshape(-1)[int(t.ptr.view_offs) // es:]
    return np.lib.stride_tricks.as_strided(flat, shape=tuple(reversed(t.ne)), strides=tuple(reversed(t.nb)))


def run_concat(backend: pg.Backend, case: Case, seed: int = 0):
    """Concatenate the case's operands on ``backend``; returns (result bits, numpy's expected bits)."""
    rng = np.random.default_rng(seed)
    wctx = pg.Context()
    sa = wctx.new_tensor(case.type, _storage_ne(case.ne_a, case.layout_a))
    sb = wctx.new_tensor(case.type, _storage_ne(case.ne_b, case.layout_b))
    buf = backend.alloc_tensors(wctx)
    data_a, data_b = _random(sa.ne, case.type, rng), _random(sb.ne, case.type, rng)
    sa.set(data_a)
    sb.set(data_b)

    ctx = pg.Context()
    a = _operand(ctx, sa, case.ne_a, case.layout_a)
    b = _operand(ctx, sb, case.ne_b, case.layout_b)
    assert a.ne == case.ne_a and b.ne == case.ne_b
    y = ctx.concat(a, b, case.dim)
    backend.compute(pg.Graph(ctx, y))
    got = _bits(y.get(raw=True)).reshape(tuple(reversed(y.ne)))

    expected = np.concatenate([_as_numpy_view(_bits(data_a), a), _as_numpy_view(_bits(data_b), b)], axis=3 - case.dim)
    del buf
    return got, expected


def test_layouts_are_non_contiguous():
    """Otherwise the permuted, padded and skipping cases would not exercise strided reads."""
    ctx = pg.Context()
    ne = (6, 5, 3, 2)
    for layout in ("perm", "pad", "skip"):
        storage = ctx.new_tensor("f32", _storage_ne(ne, layout))
        assert not _operand(ctx, storage, ne, layout).is_contiguous, layout


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_concat_matches_numpy(backend, case):
    got, expected = run_concat(backend, case)
    np.testing.assert_array_equal(got, expected)


@pytest.fixture(scope="module")
def cuda():
    if not pg.cuda_available():
        pytest.skip("needs pyggml built with CUDA (GGML_CUDA=ON) and a CUDA device")
    return pg.Backend("cuda")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_concat_matches_cpu(cuda, backend, case):
    got, expected = run_concat(cuda, case)
    ref, _ = run_concat(backend, case)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got, expected)
