"""Random ops, shapes, types, layouts and arguments through pyggml: each case either matches numpy or raises a
pyggml error (GGMLError and its subclasses), and the process never dies.

The cases run in a child process (``python test_fuzz.py SEED COUNT``), which prints one line per case before and
after running it; a crash (a ggml abort, a segfault) fails the test naming the seed and case that killed it, which
``python tests/pyggml/test_fuzz.py SEED COUNT --from N -v`` replays. Operands come in every layout the models use
(contiguous, transposed, permuted, row-padded and row-skipping views) and every type ggml offers them (F32, F16,
BF16, I32, Q8_0), with valid arguments mostly and wrong ones (mismatched shapes, NaN or negative scalars, ids out of
range, closed objects) sometimes.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import numpy as np

SEEDS = (1, 2, 3)
CASES_PER_SEED = 300
PERMUTATION = (2, 0, 3, 1)      # ggml_permute axes, as tests/pyggml/test_cuda_concat.py uses


# ------------------------------------------------------------------------------------------------------------------
# the worker: everything below runs in the child process
# ------------------------------------------------------------------------------------------------------------------
class Skip(Exception):
    """The generated case does not apply (its inputs could not be made); counted apart."""


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _tile_to(b, shape):
    return np.tile(b, [s // t for s, t in zip(shape, b.shape)])


def _softmax(x):
    m = np.max(x, -1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(x - m)
    return e / e.sum(-1, keepdims=True)


class Fuzzer:
    TYPES = ["f32"] * 5 + ["f16", "f16", "bf16", "i32", "q8_0"]
    FLOAT_TYPES = ["f32"] * 4 + ["f16", "bf16"]

    def __init__(self, seed: int, backend):
        import pyggml as pg
        self.pg = pg
        self.rng = np.random.default_rng(seed)
        self.backend = backend
        try:
            import gguf
            self.gguf = gguf
        except ImportError:  # quantized operands need gguf's quantizer
            self.gguf = None

    # -- random pieces -------------------------------------------------------------------------------------------
    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def shape(self, ndim: int | None = None, sizes=(1, 2, 3, 4, 5, 8)) -> list[int]:
        ndim = ndim or int(self.rng.integers(1, 5))
        return [int(self.pick(sizes)) for _ in range(ndim)] + [1] * (4 - ndim)

    def scalar(self, good):
        """Mostly ``good``; now and then a value ops must refuse or survive."""
        return self.pick([float("nan"), float("inf"), -1.0, -1e-5, 0.0, 1e30]) if self.chance(0.08) else good

    # -- operands ------------------------------------------------------------------------------------------------
    def operand(self, type_: str, ne, layout: str | None = None, ids_below: int | None = None):
        """A graph input of ``type_`` viewed with logical shape ``ne`` (ggml order) in a random layout; returns the
        tensor and its values as float64 in numpy order (reversed ne), or None where numpy cannot say."""
        pg, ctx = self.pg, self.ctx
        ne = list(ne) + [1] * (4 - len(ne))
        quant = type_ == "q8_0"
        if quant:
            ne[0] = 32 * max(1, ne[0] // 8)
            layout = "cont"
        layout = layout or self.pick(["cont"] * 6 + ["T", "perm", "pad", "skip"])
        if layout == "T":
            storage_ne = [ne[1], ne[0], ne[2], ne[3]]
        elif layout == "perm":
            storage_ne = [ne[PERMUTATION[i]] for i in range(4)]
        elif layout == "pad":
            storage_ne = [ne[0] + 3] + ne[1:]
        elif layout == "skip":
            storage_ne = [ne[0], 2 * ne[1]] + ne[2:]
        else:
            storage_ne = ne
        storage = ctx.new_tensor(type_, storage_ne).set_input()
        shape = tuple(reversed(storage_ne))
        if type_ == "i32":
            hi = ids_below if ids_below is not None else 5
            data = self.rng.integers(0, max(hi, 1), shape).astype(np.int32)
            if ids_below is not None and self.chance(0.1):
                data.flat[int(self.rng.integers(data.size))] = self.pick([-1, hi, hi + 7])
            values = data.astype(np.float64)
        elif quant:
            if self.gguf is None:
                raise Skip("no gguf for q8_0 data")
            f = self.rng.standard_normal(shape).astype(np.float32)
            data = self.gguf.quants.quantize(f, self.gguf.GGMLQuantizationType.Q8_0)
            values = self.gguf.quants.dequantize(data, self.gguf.GGMLQuantizationType.Q8_0).astype(np.float64)
            values = values.reshape(shape)
        else:
            f = self.rng.standard_normal(shape).astype(np.float32)
            if type_ == "f16":
                data = f.astype(np.float16)
                values = data.astype(np.float64)
            elif type_ == "bf16":
                data = f
                values = pg.dtypes.bf16_bits_to_float32(pg.dtypes.float32_to_bf16_bits(f)).astype(np.float64)
            else:
                data = f
                values = f.astype(np.float64)
        self.feed[storage] = data
        if layout == "T":
            t = ctx.transpose(storage)
        elif layout == "perm":
            t = ctx.permute(storage, *PERMUTATION)
        elif layout == "pad":
            t = ctx.view(storage, ne, storage.nb[1:], offset=storage.nb[0])
        elif layout == "skip":
            t = ctx.view(storage, ne, (2 * storage.nb[1],) + storage.nb[2:])
        else:
            t = storage
        if quant:
            return t, values
        es = storage.nb[0]
        flat = np.ascontiguousarray(values).reshape(-1)[int(t.ptr.view_offs) // es:]
        logical = np.lib.stride_tricks.as_strided(flat, shape=tuple(reversed(t.ne)),
                                                  strides=tuple(n // es * 8 for n in reversed(t.nb)))
        return t, np.array(logical)

    def floats(self, ne, layout=None, types=None):
        return self.operand(self.pick(types or self.FLOAT_TYPES), ne, layout)

    def any_type(self, ne, layout=None):
        return self.operand(self.pick(self.TYPES), ne, layout)

    # -- one case ------------------------------------------------------------------------------------------------
    def run_case(self, name: str):
        """Build, compute and check one case; returns 'ok' / 'ok-noref' or raises (a pyggml error or a mismatch)."""
        pg = self.pg
        self.ctx = pg.Context()
        self.feed = {}
        try:
            built = getattr(self, "op_" + name)()
            if built is None:
                return "ok-noref"
            out, ref, tol = built
            graph = pg.Graph(self.ctx, out)
            self.backend.compute(graph, self.feed)
            got = out.get()
            if ref is None:
                return "ok-noref"
            if out.type == pg.Type.Q8_0:
                got = self.gguf.quants.dequantize(got, self.gguf.GGMLQuantizationType.Q8_0)
            got = np.asarray(got, dtype=np.float64).reshape(tuple(reversed(out.ne)))
            ref = np.broadcast_to(np.asarray(ref, dtype=np.float64), got.shape) if np.ndim(ref) else ref
            with np.errstate(all="ignore"):    # the result type's range: overflow is inf there too
                if out.type == pg.Type.F16:
                    ref = ref.astype(np.float16).astype(np.float64)
                elif out.type == pg.Type.BF16:
                    f = np.asarray(ref, dtype=np.float32)
                    ref = pg.dtypes.bf16_bits_to_float32(pg.dtypes.float32_to_bf16_bits(f)).astype(np.float64)
            rtol, atol = tol if isinstance(tol, tuple) else (tol, tol)
            if out.type == pg.Type.F16:
                rtol, atol = max(rtol, 2e-3), max(atol, 2e-3)
            elif out.type == pg.Type.BF16:
                rtol, atol = max(rtol, 2e-2), max(atol, 2e-2)
            np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, equal_nan=True,
                                       err_msg=f"{name}: {out!r}")
            return "ok"
        finally:
            self.ctx.close()

    def out_tol(self, *types, exact=False):
        """Tolerance for results computed from operands of ``types``."""
        worst = 1e-6 if exact else 2e-4
        for t in types:
            worst = max(worst, {"f16": 4e-3, "bf16": 3e-2, "q8_0": 1e-6}.get(t, 0))
        return worst

    # -- elementwise ---------------------------------------------------------------------------------------------
    def _binary(self, name, fn):
        ne = self.shape()
        ta = self.pick(self.TYPES)
        tb = ta if self.chance(0.5) else self.pick(self.TYPES)
        nb = [1 if self.chance(0.4) else n for n in ne]
        if self.chance(0.1):
            nb = self.shape()          # probably not broadcastable
        a, av = self.operand(ta, ne)
        b, bv = self.operand(tb, nb)
        out = getattr(self.ctx, name)(a, b)
        return out, fn(av, _tile_to(bv, av.shape)), self.out_tol(ta, tb)

    def op_add(self):
        return self._binary("add", np.add)

    def op_sub(self):
        return self._binary("sub", np.subtract)

    def op_mul(self):
        return self._binary("mul", np.multiply)

    def op_div(self):
        with np.errstate(all="ignore"):
            out, ref, tol = self._binary("div", np.divide)
        return out, ref, (1e-3, 1e-3) if tol < 1e-3 else tol

    def op_scale(self):
        t = self.pick(self.TYPES)
        a, av = self.operand(t, self.shape())
        s, b = self.scalar(0.5), self.scalar(0.0) if self.chance(0.5) else 0.25
        return self.ctx.scale_bias(a, s, b), av * s + b, self.out_tol(t)

    def op_clamp(self):
        t = self.pick(self.TYPES)
        a, av = self.operand(t, self.shape())
        lo, hi = self.scalar(-0.5), 0.5
        return self.ctx.clamp(a, lo, hi), np.clip(av, lo, hi) if lo <= hi else None, self.out_tol(t)

    UNARY = {
        "gelu": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
        "gelu_erf": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
        "silu": lambda x: x / (1 + np.exp(-x)),
        "relu": lambda x: np.maximum(x, 0),
        "tanh": np.tanh,
        "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
        "exp": np.exp,
        "sqr": np.square,
        "sqrt": np.sqrt,
        "log": np.log,
    }

    def op_unary(self):
        name = self.pick(sorted(self.UNARY))
        t = self.pick(self.TYPES)
        a, av = self.operand(t, self.shape())
        with np.errstate(all="ignore"):
            ref = self.UNARY[name](av)
        return getattr(self.ctx, name)(a), ref, max(self.out_tol(t), 2e-3)

    def op_leaky_relu(self):
        t = self.pick(self.TYPES)
        a, av = self.operand(t, self.shape())
        slope = self.scalar(0.2)
        return self.ctx.leaky_relu(a, slope), np.where(av > 0, av, slope * av), self.out_tol(t)

    def op_reduce(self):
        name = self.pick(["sum_rows", "mean", "argmax"])
        t = self.pick(self.TYPES)
        ne = self.shape()
        if name == "argmax" and self.chance(0.8):
            ne[2] = ne[3] = 1
        a, av = self.operand(t, ne)
        out = getattr(self.ctx, name)(a)
        if name == "sum_rows":
            return out, av.sum(-1, keepdims=True), self.out_tol(t)
        if name == "mean":
            return out, av.mean(-1, keepdims=True), self.out_tol(t)
        return out, av.argmax(-1).reshape(1, 1, 1, -1), 0

    # -- normalisation -------------------------------------------------------------------------------------------
    def op_norm(self):
        name = self.pick(["norm", "rms_norm", "l2_norm"])
        t = self.pick(self.TYPES)
        a, av = self.operand(t, self.shape())
        eps = self.scalar(1e-5)
        out = getattr(self.ctx, name)(a, eps)
        if name == "norm":
            ref = (av - av.mean(-1, keepdims=True)) / np.sqrt(av.var(-1, keepdims=True) + eps)
        elif name == "rms_norm":
            ref = av / np.sqrt((av * av).mean(-1, keepdims=True) + eps)
        else:
            ref = av / np.maximum(np.sqrt((av * av).sum(-1, keepdims=True)), eps)
        return out, ref, 2e-3

    def op_group_norm(self):
        t = self.pick(self.TYPES)
        groups = int(self.pick([1, 2, 3, 4]))
        ne = [int(self.pick([1, 3, 5])), 1, int(self.pick([2, 4, 6, 8])), int(self.pick([1, 2]))]
        a, av = self.operand(t, ne, self.pick(["cont", "cont", "T"]))
        eps = self.scalar(1e-5)
        out = self.ctx.group_norm(a, groups, eps)
        b, c = av.shape[0], av.shape[1]
        if c % groups:
            return out, None, 0
        g = av.reshape(b, groups, -1)
        ref = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)).reshape(av.shape)
        return out, ref, 2e-3

    # -- attention -----------------------------------------------------------------------------------------------
    def op_soft_max(self):
        t = self.pick(self.TYPES)
        ne = self.shape()
        a, av = self.operand(t, ne)
        if self.chance(0.3):
            return self.ctx.soft_max(a), _softmax(av), 1e-4
        mtype = self.pick(["f16", "f32", "i32"])
        mne = [ne[0], ne[1] + int(self.pick([0, 0, 1])), 1 if self.chance(0.5) else ne[2], 1]
        m, mv = self.operand(mtype, mne, "cont")
        scale, bias = self.scalar(0.5), 0.0 if self.chance(0.9) else self.scalar(1.0)
        out = self.ctx.soft_max_ext(a, m, scale, bias)
        if bias:
            return out, None, 0
        return out, _softmax(av * scale + np.tile(mv[:, :, :ne[1], :], (1, ne[2] // mv.shape[1], 1, 1))), 1e-3

    def op_diag_mask_inf(self):
        t = self.pick(self.TYPES)
        ne = self.shape()
        a, av = self.operand(t, ne)
        n_past = int(self.pick([0, 1, 2, -1]))
        out = self.ctx.diag_mask_inf(a, n_past)
        rows, cols = np.indices(av.shape[-2:])
        return out, np.where(cols > rows + n_past, -np.inf, av), 0

    def op_flash_attn(self):
        d = int(self.pick([4, 8, 16]))
        nq, nkv, h, b = (int(self.pick(s)) for s in ((1, 2, 3), (1, 3, 5), (1, 2, 4), (1, 2)))
        hkv = h if self.chance(0.7) else 1
        tq = self.pick(["f32"] * 4 + ["f16"])
        tk = self.pick(["f16", "f16", "f32", "bf16"])
        tv = tk if self.chance(0.9) else self.pick(["f16", "f32"])
        q, qv = self.operand(tq, [d, nq, h, b], self.pick(["cont", "cont", "perm"]))
        k, kv = self.operand(tk, [d, nkv, hkv, b], self.pick(["cont", "cont", "pad"]))
        v, vv = self.operand(tv, [d, nkv, hkv, b], self.pick(["cont", "cont", "pad"]))
        mask, mv = None, np.zeros((1, 1, nq, nkv))
        if self.chance(0.7):
            mask, mv = self.operand(self.pick(["f16"] * 4 + ["f32"]), [nkv, nq + int(self.pick([0, 1])), 1, 1],
                                    "cont")
        scale = self.scalar(1 / math.sqrt(d))
        out = self.ctx.flash_attn_ext(q, k, v, mask, scale)
        rep = h // hkv
        kk, vvv = np.repeat(kv, rep, axis=1), np.repeat(vv, rep, axis=1)      # numpy (B, H, n, D)
        s = np.einsum("bhqd,bhkd->bhqk", qv, kk) * scale + mv[:, :, :nq, :]
        ref = np.einsum("bhqk,bhkd->bhqd", _softmax(s), vvv).transpose(0, 2, 1, 3)  # (B, nq, H, D)
        return out, ref, 2e-2

    # -- matmul --------------------------------------------------------------------------------------------------
    def op_mul_mat(self):
        k, m, n = int(self.pick([4, 8, 32, 64])), int(self.pick([1, 3, 4])), int(self.pick([1, 2, 5]))
        a2, a3 = int(self.pick([1, 2])), 1
        b2, b3 = a2 * int(self.pick([1, 2])), int(self.pick([1, 2]))
        ta = self.pick(self.TYPES)
        tb = self.pick(["f32"] * 5 + ["f16", "bf16", "i32"])
        if self.chance(0.1):
            k2 = k + 1
        else:
            k2 = k
        a, av = self.operand(ta, [k, m, a2, a3], None if ta != "q8_0" else "cont")
        b, bv = self.operand(tb, [a.ne[0] if k2 == k else k2, n, b2, b3])
        out = self.ctx.mul_mat(a, b)
        aa = np.repeat(np.repeat(av, b2 // a2, axis=1), b3 // a3, axis=0)
        bb = self.as_dot_operand(bv, ta)      # ggml converts b to a's dot-product type first
        return out, bb @ np.swapaxes(aa, -1, -2), {"f16": 1e-2, "bf16": 3e-2, "q8_0": 5e-2}.get(ta, 1e-3)

    def as_dot_operand(self, x, weight_type: str):
        """``x`` rounded as ggml-cpu converts a matmul's second operand for a ``weight_type`` first operand."""
        pg = self.pg
        if weight_type == "f16":
            return x.astype(np.float16).astype(np.float64)
        if weight_type == "bf16":
            f = x.astype(np.float32)
            return pg.dtypes.bf16_bits_to_float32(pg.dtypes.float32_to_bf16_bits(f)).astype(np.float64)
        if weight_type == "q8_0" and self.gguf is not None:
            q = self.gguf.GGMLQuantizationType.Q8_0
            f = np.ascontiguousarray(x, dtype=np.float32)
            return self.gguf.quants.dequantize(self.gguf.quants.quantize(f, q), q).reshape(x.shape).astype(np.float64)
        return x

    # -- layout --------------------------------------------------------------------------------------------------
    def op_copy(self):
        kind = self.pick(["cont", "cpy", "cast", "transpose", "permute", "reshape", "view"])
        ta = self.pick(self.TYPES)
        a, av = self.operand(ta, self.shape())
        ctx = self.ctx
        if kind == "cont":
            return ctx.cont(a), av, 0
        if kind in ("cpy", "cast"):
            tb = self.pick(self.TYPES)
            if kind == "cast":
                out = ctx.cast(a, tb)
            else:
                b, _ = self.operand(tb, a.ne if self.chance(0.9) else self.shape(), "cont")
                out = ctx.cpy(a, b)
            ref = (av if tb != "i32" else np.trunc(av)).reshape(tuple(reversed(out.ne)))  # in b's shape
            return out, ref if tb != "q8_0" else None, 4e-2 if tb == "bf16" or ta == "bf16" else 4e-3
        if kind == "transpose":
            return ctx.cont(ctx.transpose(a)), np.swapaxes(av, -1, -2), 0
        if kind == "permute":
            axes = [int(x) for x in self.rng.permutation(4)]
            if self.chance(0.05):
                axes[0] = axes[1]
            out = ctx.cont(ctx.permute(a, *axes))
            inv = [0] * 4
            for i, ax in enumerate(axes):
                inv[ax] = i           # result dim ax is source dim i
            # numpy order: result axis (3 - ax) is source axis (3 - i)
            return out, np.transpose(av, [3 - inv[3 - j] for j in range(4)]), 0
        if kind == "reshape":
            n = a.nelements
            ne = [n, 1] if self.chance(0.5) else [1, n]
            if self.chance(0.1):
                ne = [n + 1]
            return ctx.cont(ctx.reshape(a, *ne)), av.reshape(tuple(reversed(ne + [1] * (4 - len(ne))))), 0
        # a sub-view of a's rows
        n1 = max(1, a.ne[1] - 1)
        off = a.nb[1] if a.ne[1] > 1 and self.chance(0.7) else 0
        if self.chance(0.1):
            off = a.nbytes
        out = ctx.cont(ctx.view(a, (a.ne[0], n1, a.ne[2], a.ne[3]), a.nb[1:], offset=off))
        start = off // a.nb[1] if a.nb[1] else 0
        return out, av[:, :, start:start + n1, :], 0

    def op_repeat(self):
        ta = self.pick(self.TYPES)
        ne = self.shape(sizes=(1, 2, 3))
        reps = [int(self.pick([1, 1, 2, 3])) for _ in range(4)]
        a, av = self.operand(ta, ne)
        target = [n * r for n, r in zip(a.ne, reps)]
        if self.chance(0.1):
            target[0] += 1
        if self.chance(0.5):
            out = self.ctx.repeat(a, self.ctx.new_tensor("f32", target))
        else:
            out = self.ctx.repeat_4d(a, *target)
        return out, _tile_to(av, tuple(reversed(target))), 0

    def op_concat(self):
        ta = self.pick(self.TYPES)
        tb = ta if self.chance(0.9) else self.pick(self.TYPES)
        dim = int(self.pick([0, 1, 2, 3, 4]))
        ne = self.shape()
        nb = list(ne)
        if dim < 4:
            nb[dim] = int(self.pick([1, 2, 3]))
        a, av = self.operand(ta, ne)
        b, bv = self.operand(tb, nb if ta != "q8_0" else a.ne)
        out = self.ctx.concat(a, b, dim)
        return out, np.concatenate([av, bv], axis=3 - dim), 0

    def op_pad(self):
        t = self.pick(self.TYPES)
        a, av = self.operand(t, self.shape())
        pads = [int(self.pick([0, 0, 1, 2, -1 if self.chance(0.05) else 0])) for _ in range(8)]
        if self.chance(0.5):
            pads[0::2] = [0] * 4
            out = self.ctx.pad(a, *pads[1::2])
        else:
            out = self.ctx.pad_ext(a, *pads)
        width = [(pads[2 * (3 - i)], pads[2 * (3 - i) + 1]) for i in range(4)]
        return out, np.pad(av, width) if min(pads) >= 0 else None, 0

    def op_pad_reflect(self):
        t = self.pick(self.TYPES)
        ne = self.shape()
        ne[0] = int(self.pick([2, 3, 5, 8]))
        a, av = self.operand(t, ne)
        p0, p1 = int(self.pick([0, 1, 2, 4, -1])), int(self.pick([0, 1, 3]))
        out = self.ctx.pad_reflect_1d(a, p0, p1)
        width = [(0, 0)] * 3 + [(p0, p1)]
        return out, np.pad(av, width, mode="reflect"), 0

    # -- rows ----------------------------------------------------------------------------------------------------
    def op_get_rows(self):
        ta = self.pick(self.TYPES)
        rows = int(self.pick([1, 3, 7]))
        d, b1, b2, n = int(self.pick([4, 8, 32])), int(self.pick([1, 2])), 1, int(self.pick([1, 2, 5]))
        a, av = self.operand(ta, [d, rows, b1, b2])
        ids, iv = self.operand(self.pick(["i32"] * 9 + ["f32"]), [n, b1 if self.chance(0.95) else b1 + 1, b2],
                               "cont", ids_below=a.ne[1])
        out = self.ctx.get_rows(a, ids)
        idx = iv.astype(np.int64)
        if idx.min() < 0 or idx.max() >= a.ne[1]:
            return out, None, 0        # compute must refuse these
        ref = np.stack([np.stack([av[0, j][idx[0, 0, j]] for j in range(av.shape[1])])])
        return out, ref, 0

    def op_set_rows(self):
        ta = self.pick(["f32", "f32", "f16", "bf16", "q8_0", "i32"])
        tb = self.pick(["f32", "f32", "f16", "bf16"])
        d, rows, n = int(self.pick([4, 8, 32])), int(self.pick([3, 6])), int(self.pick([1, 2, 3]))
        dst, dv = self.operand(ta, [d, rows, 1, 1], "cont")
        src, sv = self.operand(tb, [dst.ne[0], n, 1, 1], self.pick(["cont", "cont", "pad"]))
        ids = self.ctx.new_tensor(self.pick(["i32", "i32", "i64"]), [n]).set_input()
        perm = self.rng.permutation(rows)[:n].astype(np.int64)
        if self.chance(0.1):
            perm[0] = self.pick([-1, rows])
        self.feed[ids] = perm.astype(np.int32 if ids.type == self.pg.Type.I32 else np.int64)
        out = self.ctx.set_rows(dst, src, ids)
        if perm.min() < 0 or perm.max() >= rows or ta in ("q8_0", "i32"):
            return out, None, 0
        ref = dv.copy()
        ref[0, 0, perm, :] = sv[0, 0]
        return out, ref, self.out_tol(ta, tb)

    # -- convolution ---------------------------------------------------------------------------------------------
    def op_im2col(self):
        k, c, length, b = int(self.pick([1, 2, 3])), int(self.pick([1, 2])), int(self.pick([4, 7])), int(
            self.pick([1, 2]))
        s, p, dil = int(self.pick([1, 2, 0])), int(self.pick([0, 1, -1])), int(self.pick([1, 2]))
        kern = self.ctx.new_tensor("f32", [k, c if self.chance(0.95) else c + 1])   # its shape only is read
        if self.chance(0.5):
            kern.set_input()
        tx = self.pick(["f32", "f32", "f16", "i32"])
        x, xv = self.operand(tx, [length, c, b, 1])
        dst = self.pick(["f32", "f32", "f16"])
        out = self.ctx.im2col(kern, x, s, 0, p, 0, dil, 0, False, dst)
        xp = np.pad(xv[0], [(0, 0), (0, 0), (p, p)])                      # (B, C, L + 2p)
        t_out = out.ne[1]
        cols = np.stack([np.stack([xp[:, ci, t * s: t * s + dil * (k - 1) + 1: dil] for ci in range(c)], 1)
                         for t in range(t_out)], 1)                        # (B, T, C, K)
        return out, cols.reshape(1, b, t_out, c * k), self.out_tol(tx, dst)

    def op_conv_transpose(self):
        k, cin, cout, length = (int(self.pick(v)) for v in ((1, 3, 4), (1, 2, 3), (1, 2), (2, 5)))
        s = int(self.pick([1, 2, 3, 0]))
        tk = self.pick(["f32", "f32", "f16", "bf16"])
        w, wv = self.operand(tk, [k, cout, cin, 1], self.pick(["cont", "cont", "pad"]))
        x, xv = self.operand(self.pick(["f32"] * 5 + ["f16"]), [length, cin if self.chance(0.95) else cin + 1, 1, 1],
                             self.pick(["cont", "cont", "T", "pad"]))
        out = self.ctx.conv_transpose_1d(w, x, s)
        wn, xn = wv[0], xv[0, 0]                     # (C_in, C_out, K), (C_in, L)
        ref = np.zeros((cout, (length - 1) * s + k))
        for t in range(length):
            ref[:, t * s: t * s + k] += np.einsum("i,iok->ok", xn[:, t], wn)
        return out, ref, max(self.out_tol(tk), 1e-3) * 4

    def op_interpolate(self):
        t = self.pick(self.TYPES)
        a, _ = self.operand(t, self.shape())
        ne = [max(1, n * int(self.pick([1, 2])) // int(self.pick([1, 2]))) for n in a.ne]
        if self.chance(0.05):
            ne[0] = 0
        mode = self.pick(["nearest", "bilinear", "bicubic"])
        return self.ctx.interpolate(a, ne, mode), None, 0

    def op_timestep(self):
        t = self.pick(self.TYPES)
        n = int(self.pick([1, 3]))
        ts, tv = self.operand(t, [n, 1 if self.chance(0.9) else 2], "cont")
        dim = int(self.pick([4, 8, 16, 5, 0]))
        period = int(self.pick([10000, 10000, 100, 0]))
        out = self.ctx.timestep_embedding(ts, dim, period)
        if dim % 2:
            return out, None, 0
        freqs = np.exp(-math.log(period) * np.arange(dim // 2) / (dim // 2))
        args = tv.reshape(-1)[:, None] * freqs[None]
        return out, np.concatenate([np.cos(args), np.sin(args)], -1), 1e-3

    def op_rope(self):
        t = self.pick(["f32"] * 4 + ["f16", "bf16"])
        d, h, length, b = int(self.pick([4, 8])), int(self.pick([1, 2])), int(self.pick([1, 3])), 1
        a, av = self.operand(t, [d, h, length, b], self.pick(["cont", "cont", "perm", "pad"]))
        pos, pv = self.operand(self.pick(["i32"] * 9 + ["f32"]), [length if self.chance(0.95) else length + 1],
                               "cont", ids_below=50)
        n_dims = int(self.pick([d, d, d // 2, 3, 0, d + 2]))
        base = self.scalar(10000.0)
        out = self.ctx.rope_neox(a, pos, n_dims, base)
        half = n_dims // 2
        theta = pv.reshape(-1)[:, None] * base ** (-2 * np.arange(half) / n_dims)      # (T, half)
        cos, sin = np.cos(theta)[None, :, None, :], np.sin(theta)[None, :, None, :]
        x0, x1 = av[..., :half], av[..., half:n_dims]
        ref = np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos, av[..., n_dims:]], -1)
        return out, ref, max(self.out_tol(t), 1e-4)

    def op_geglu(self):
        t = self.pick(self.TYPES)
        ne = self.shape()
        ne[0] = int(self.pick([2, 4, 8, 3]))
        a, av = self.operand(t, ne)
        swapped = self.chance(0.5)
        out = self.ctx.geglu_erf(a, swapped)
        h = av.shape[-1] // 2
        x, g = av[..., :h], av[..., h:2 * h]
        gelu = self.UNARY["gelu_erf"]
        return out, (x * gelu(g) if swapped else gelu(x) * g), max(self.out_tol(t), 2e-3)

    # -- views, memory, data ---------------------------------------------------------------------------------------
    def op_view_any(self):
        """Views and strided views with random (often wrong) extents, strides and offsets."""
        t = self.pick(self.TYPES)
        a, av = self.operand(t, self.shape(), self.pick(["cont", "cont", "T", "pad"]))
        ne = [max(0, n + int(self.pick([0, 0, 0, -1, 1]))) for n in a.ne]
        nb = [max(0, s + int(self.pick([0, 0, 0, 4, -4]))) for s in a.nb[1:]]
        offset = int(self.pick([0, 0, a.nb[0], a.nb[1], a.nbytes, -4]))
        if self.chance(0.3):
            out = self.ctx.view_strided(a, ne, nb, offset)
        else:
            out = self.ctx.view(a, ne, nb, offset)
        if out.nelements == 0:
            return None                  # an empty view computes nothing
        return self.ctx.cont(out), None, 0

    def op_small_context(self):
        """Ops in a context too small for them: OutOfContextMemory, never ggml's abort."""
        pg = self.pg
        no_alloc = self.chance(0.5)
        overhead = pg.raw.lib.ggml_tensor_overhead()
        ctx = pg.Context(overhead * int(self.pick([1, 2, 3])) + int(self.pick([0, 64, 4096])), no_alloc=no_alloc)
        try:
            x = ctx.new_tensor("f32", [int(self.pick([4, 64, 1024]))])
            y = self.pick([lambda: ctx.add(x, x), lambda: ctx.concat(x, x, 0), lambda: ctx.scale(x, 2.0),
                           lambda: ctx.pad(x, 100), lambda: ctx.mul_mat(x, x)])()
            pg.Graph(ctx, y)
        finally:
            ctx.close()
        return None

    def op_huge(self):
        """Shapes whose byte size overflows, or is merely far too large to allocate."""
        pg = self.pg
        ne = [int(self.pick([1 << 20, 1 << 31, 1 << 40, 1 << 62, 2 ** 63 + 5, -3])) for _ in range(2)]
        what = self.pick(["new", "pad", "repeat", "alloc", "reshape"])
        if what == "new":
            t = self.ctx.new_tensor(self.pick(["f32", "q8_0"]), ne)
            if t.nbytes < pg.context.MAX_BYTES:
                return None      # a description only: fine until allocated
        elif what == "alloc":
            c = pg.Context()
            c.new_tensor("f32", [1 << 20, 1 << 20, 1 << 10])
            self.backend.alloc_tensors(c)
        else:
            a = self.ctx.new_tensor("f32", [4, 4]).set_input()
            if what == "pad":
                t = self.ctx.pad(a, ne[0], ne[1])
            elif what == "repeat":
                t = self.ctx.repeat_4d(a, 4 * (1 << 30), 4 * (1 << 30), 1 << 20)
            else:
                t = self.ctx.reshape(a, ne[0], ne[1])
            if t.nbytes < pg.context.MAX_BYTES:
                return None      # a description only, in a no_alloc context: fine until computed
        raise AssertionError(f"a huge shape ({what}, {ne}) was accepted")

    def op_data(self):
        """Tensor.set / get with arrays of the wrong shape, dtype or size."""
        t = self.pick(self.TYPES)
        wctx = self.pg.Context()
        x = wctx.new_tensor(t, [32, 2])
        buf = self.backend.alloc_tensors(wctx)
        try:
            arr = self.pick([np.zeros((2, 32)), np.zeros((32, 2)), np.zeros((3, 32)), np.zeros(64, np.uint8),
                             np.zeros((2, 32), np.float16), np.zeros(2 * 34, np.uint8), np.array("text")])
            x.set(arr, offset=int(self.pick([0, 0, 4, 10 ** 6])))
            got = x.get()
            if t != "q8_0" and got.shape != (2, 32):
                raise AssertionError(f"get returned shape {got.shape}")
        except (ValueError, TypeError) as e:     # numpy's own conversion errors for nonsense arrays
            if not isinstance(e, self.pg.GGMLError):
                raise self.pg.ShapeError(f"numpy refused: {e}") from None
        finally:
            buf.free()
            wctx.close()
        return None

    def op_stale(self):
        """Results read after another graph reused the allocator's memory, or after a CachedGraph moved on."""
        pg = self.pg
        x = self.ctx.new_tensor("f32", [8]).set_input()
        y = self.ctx.scale(x, 2.0)
        self.backend.compute(pg.Graph(self.ctx, y), {x: np.ones(8, np.float32)})
        other = pg.Context()
        try:
            z = other.new_tensor("f32", [8]).set_input()
            self.backend.compute(pg.Graph(other, other.scale(z, 3.0)), {z: np.ones(8, np.float32)})
            y.get()
        finally:
            other.close()
        raise AssertionError("a stale result was read back")

    # -- lifetime ------------------------------------------------------------------------------------------------
    def op_closed(self):
        """Use a tensor, graph, buffer or backend after its owner was closed."""
        pg = self.pg
        what = self.pick(["ctx-op", "ctx-get", "ctx-graph", "buffer", "backend", "weights-ctx"])
        if what == "backend":
            be = pg.Backend("cpu", threads=1)
            x = self.ctx.new_tensor("f32", [4]).set_input()
            g = pg.Graph(self.ctx, self.ctx.scale(x, 2.0))
            be.close()
            be.compute(g, {x: np.zeros(4, np.float32)})
            raise AssertionError("compute on a closed backend did not raise")
        wctx = pg.Context()
        w = wctx.new_tensor("f32", [4, 3])
        buf = self.backend.alloc_tensors(wctx)
        w.set(np.ones((3, 4), np.float32))
        x = self.ctx.new_tensor("f32", [4, 3]).set_input()
        y = self.ctx.add(x, w)
        g = pg.Graph(self.ctx, y)
        self.backend.compute(g, {x: np.ones((3, 4), np.float32)})
        if what == "buffer":
            buf.free()
            self.pick([lambda: w.get(), lambda: self.backend.compute(g, {x: np.ones((3, 4), np.float32)})])()
        elif what == "weights-ctx":
            wctx.close()
            self.pick([lambda: w.get(), lambda: self.ctx.add(x, w),
                       lambda: self.backend.compute(g, {x: np.ones((3, 4), np.float32)})])()
        else:
            c2 = pg.Context()
            t = c2.new_tensor("f32", [4, 3])
            c2.close()
            if what == "ctx-op":
                self.ctx.add(x, t)
            elif what == "ctx-get":
                t.get()
            else:
                pg.Graph(c2, t)
        raise AssertionError(f"use after close ({what}) did not raise")

    def op_inputs(self):
        """Inputs left out, given twice over, or not part of the graph."""
        pg = self.pg
        x = self.ctx.new_tensor("f32", [4]).set_input()
        z = self.ctx.new_tensor("f32", [4]).set_input()
        y = self.ctx.add(x, z)
        g = pg.Graph(self.ctx, y)
        stray = self.ctx.new_tensor("f32", [4]).set_input()
        feed = self.pick([{x: np.ones(4, np.float32)}, {x: np.ones(4, np.float32), z: np.ones(4, np.float32),
                                                        stray: np.ones(4, np.float32)}])
        self.backend.compute(g, feed)
        raise AssertionError("a missing or stray input was accepted")


OPS = [n[3:] for n in dir(Fuzzer) if n.startswith("op_")]
WEIGHTS = {"closed": 0.3, "inputs": 0.3}


def worker(seed: int, count: int, start: int = 0, verbose: bool = False) -> int:
    import pyggml as pg
    backend = pg.Backend("cpu", threads=2)
    names = sorted(OPS)
    p = np.array([WEIGHTS.get(n, 1.0) for n in names])
    picker = np.random.default_rng(seed * 7919 + 17)
    plan = [names[i] for i in picker.choice(len(names), size=count, p=p / p.sum())]
    for i in range(start, count):
        print(f"START {seed} {i} {plan[i]}", flush=True)
        fz = Fuzzer(seed * 100003 + i, backend)
        try:
            result = fz.run_case(plan[i])
        except Skip as e:
            result = f"skip ({e})"
        except pg.GGMLError as e:
            result = f"error {type(e).__name__}: {e}"
        except AssertionError as e:
            result = "MISMATCH " + " ".join(str(e).split())[:2000]
        except Exception as e:  # any other Python error: not a pyggml error, reported as a failure
            result = f"PYERROR {type(e).__name__}: {e}"
        print(f"DONE {seed} {i} {plan[i]} {result if verbose else result[:300]}", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------------------------
# the test
# ------------------------------------------------------------------------------------------------------------------
def run_worker(seed: int, count: int, timeout: float = 120):
    env = dict(os.environ, PYTHONFAULTHANDLER="0")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(seed), str(count)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    return proc


def parse(stdout: str):
    started, done = {}, {}
    for line in stdout.splitlines():
        parts = line.split(" ", 4)
        if len(parts) >= 4 and parts[0] in ("START", "DONE"):
            key = (int(parts[1]), int(parts[2]))
            (started if parts[0] == "START" else done)[key] = (parts[3], parts[4] if len(parts) > 4 else "")
    return started, done


def test_fuzz_ops_never_crash_and_match_numpy():
    t0 = time.time()
    failures, tally = [], {}
    for seed in SEEDS:
        proc = run_worker(seed, CASES_PER_SEED)
        started, done = parse(proc.stdout)
        for key, (op, result) in done.items():
            kind = result.split(" ", 1)[0]
            tally[kind] = tally.get(kind, 0) + 1
            if kind in ("MISMATCH", "PYERROR"):
                failures.append(f"seed {key[0]} case {key[1]} ({op}): {result}")
        crashed = [k for k in started if k not in done]
        if proc.returncode != 0 or crashed:
            where = f"case {crashed[0][1]} ({started[crashed[0]][0]})" if crashed else "after the last case"
            failures.append(f"seed {seed}: the process died (exit {proc.returncode}) at {where}: "
                            f"{proc.stderr.strip()[-600:]}  [replay: python {__file__} {seed} {CASES_PER_SEED} "
                            f"--from {crashed[0][1] if crashed else 0} -v]")
        assert len(done) == CASES_PER_SEED or failures, proc.stderr[-2000:]
    print(f"fuzz: {sum(tally.values())} cases in {time.time() - t0:.1f}s: {tally}")
    assert not failures, "\n".join(failures)
    assert tally.get("ok", 0) >= 0.25 * sum(tally.values()), f"too few cases computed: {tally}"
    assert tally.get("error", 0) >= 0.1 * sum(tally.values()), f"too few refused cases: {tally}"


if __name__ == "__main__":
    args = sys.argv[1:]
    verbose = "-v" in args
    start = int(args[args.index("--from") + 1]) if "--from" in args else 0
    pos = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] != "--from")]
    sys.exit(worker(int(pos[0]), int(pos[1]), start, verbose))
