"""``Context``: a ggml context, and the graph-building ops, each checked in Python first.

ggml asserts its preconditions and aborts the process when one fails, so every op here checks the conditions that
ggml (at graph-build time) and its CPU kernels (at compute time) assert, and raises ShapeError/TypeError instead.
Ops take and return ``Tensor``; tensors of other contexts (weights, say) are fine as operands.
``ctx.op("name", ...)`` reaches any other ``ggml_<name>`` unchecked.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .dtypes import NUMPY_DTYPES, Type, as_type, is_quantized, type_name
from .errors import GGMLError, OutOfContextMemory, ShapeError
from .raw import ffi, lib
from .tensor import Tensor

_FLOAT_TYPES = (Type.F32, Type.F16, Type.BF16)


def _t(x, what: str = "operand") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a pyggml Tensor, not {type(x).__name__}")
    return x


def _can_repeat(b: Tensor, a: Tensor) -> bool:
    """ggml_can_repeat(b, a): b broadcasts to a."""
    return all(bn > 0 and an % bn == 0 for an, bn in zip(a.ne, b.ne)) or b.nelements == 0


def _rows_contiguous(t: Tensor) -> bool:
    return bool(lib.ggml_is_contiguous_1(t.ptr))


def _require(cond: bool, msg) -> None:
    """Raise ShapeError unless ``cond``; ``msg`` may be a callable, so that hot paths build no message text."""
    if not cond:
        raise ShapeError(msg() if callable(msg) else msg)


def _need_float(t: Tensor, op: str, types=(Type.F32,)) -> None:
    if t.type not in types:
        names = "/".join(type_name(x) for x in types)
        raise ShapeError(f"{op}: needs {names} input, got {t!r}")


class Context:
    """A ggml context.

    With ``no_alloc=True`` (the default) it holds tensor and graph descriptions only; their memory comes from a
    backend (``Backend.alloc_tensors(ctx)`` for weights, ``Backend.compute(graph)`` for intermediate results).
    With ``no_alloc=False`` tensors get host memory from the context itself (``mem_size`` must cover it).
    """

    def __init__(self, mem_size: int | None = None, *, no_alloc: bool = True, max_tensors: int = 8192,
                 graph_size: int = 16384):
        if mem_size is None:
            mem_size = (lib.ggml_tensor_overhead() * max_tensors
                        + lib.ggml_graph_overhead_custom(graph_size, False) + 4096)
        if mem_size <= 0:
            raise ValueError("mem_size must be positive")
        self.no_alloc = bool(no_alloc)
        self.ptr = lib.ggml_init({"mem_size": int(mem_size), "mem_buffer": ffi.NULL, "no_alloc": self.no_alloc})
        if self.ptr == ffi.NULL:
            raise MemoryError(f"ggml_init could not get {mem_size} bytes")

    # -- lifetime ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "ptr", ffi.NULL) != ffi.NULL:
            lib.ggml_free(self.ptr)
            self.ptr = ffi.NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def _live(self):
        if self.ptr == ffi.NULL:
            raise GGMLError("this Context was closed")
        return self.ptr

    @property
    def mem_size(self) -> int:
        return lib.ggml_get_mem_size(self._live())

    @property
    def used_mem(self) -> int:
        return lib.ggml_used_mem(self._live())

    def _room(self, data_bytes: int = 0, what: str = "a tensor") -> None:
        need = lib.ggml_tensor_overhead() + (0 if self.no_alloc else data_bytes + lib.GGML_MEM_ALIGN)
        free = self.mem_size - self.used_mem
        if need > free:
            raise OutOfContextMemory(f"context full: {what} needs {need} bytes, {free} of {self.mem_size} left "
                                     "(create the Context with a larger mem_size/max_tensors)")

    def _wrap(self, fn, *args) -> Tensor:
        self._room()
        return Tensor(fn(self._live(), *[a.ptr if isinstance(a, Tensor) else a for a in args]), self)

    # -- tensors -----------------------------------------------------------------------------------------------
    def new_tensor(self, type, ne: Sequence[int], name: str | None = None) -> Tensor:
        """A new tensor of ggml type ``type`` and shape ``ne`` (ggml order, 1 to 4 dims)."""
        t = as_type(type)
        ne = [int(n) for n in ne]
        if not 1 <= len(ne) <= 4:
            raise ShapeError(f"a ggml tensor has 1 to 4 dimensions, got ne={tuple(ne)}")
        if any(n < 0 for n in ne):
            raise ShapeError(f"negative dimension in ne={tuple(ne)}")
        blck = lib.ggml_blck_size(int(t))
        if ne[0] % blck:
            raise ShapeError(f"{type_name(t)} stores blocks of {blck}: ne[0]={ne[0]} is not a multiple")
        nbytes = lib.ggml_row_size(int(t), ne[0]) * int(np.prod(ne[1:], dtype=np.int64))
        self._room(nbytes)
        arr = ffi.new("int64_t[]", ne)
        out = Tensor(lib.ggml_new_tensor(self._live(), int(t), len(ne), arr), self)
        if name:
            out.name = name
        return out

    def from_numpy(self, array, name: str | None = None, type=None) -> Tensor:
        """A tensor shaped like ``array`` (numpy order); its data is copied now if the context holds memory."""
        arr = np.asarray(array)
        t = as_type(type) if type is not None else as_type(arr.dtype)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        out = self.new_tensor(t, tuple(reversed(arr.shape)), name)
        if out.is_allocated:
            out.set(arr)
        return out

    def tensors(self) -> list[Tensor]:
        out, p = [], lib.ggml_get_first_tensor(self._live())
        while p != ffi.NULL:
            out.append(Tensor(p, self))
            p = lib.ggml_get_next_tensor(self.ptr, p)
        return out

    # -- layout ------------------------------------------------------------------------------------------------
    def reshape(self, a: Tensor, *ne: int) -> Tensor:
        _t(a)
        ne = tuple(int(n) for n in (ne[0] if len(ne) == 1 and isinstance(ne[0], (tuple, list)) else ne))
        _require(1 <= len(ne) <= 4, lambda: f"reshape: 1 to 4 dims, got {ne}")
        _require(a.is_contiguous, lambda: f"reshape: {a!r} is not contiguous (ctx.cont first)")
        _require(int(np.prod(ne)) == a.nelements, lambda: f"reshape: {a!r} has {a.nelements} elements, ne={ne} has "
                                                          f"{int(np.prod(ne))}")
        fn = [None, lib.ggml_reshape_1d, lib.ggml_reshape_2d, lib.ggml_reshape_3d, lib.ggml_reshape_4d][len(ne)]
        return self._wrap(fn, a, *ne)

    def view(self, a: Tensor, ne: Sequence[int], nb: Sequence[int] | None = None, offset: int = 0) -> Tensor:
        """ggml_view_Nd: ``ne`` in ggml order, ``nb`` the strides of dims 1.. in bytes (default: a's strides)."""
        _t(a)
        ne = [int(n) for n in ne]
        _require(1 <= len(ne) <= 4, lambda: f"view: 1 to 4 dims, got {ne}")
        nb = list(a.nb[1:len(ne)]) if nb is None else [int(x) for x in nb]
        _require(len(nb) == len(ne) - 1, lambda: f"view: {len(ne)}-d view takes {len(ne) - 1} strides, got {len(nb)}")
        _require(offset >= 0, "view: negative offset")
        size = lib.ggml_row_size(a.ptr.type, ne[0]) if ne[0] else 0
        for n, s in zip(ne[1:], nb):
            size = max(size, size + (n - 1) * s) if n else 0
        _require(size + offset <= a.nbytes or 0 in ne,
                 lambda: f"view: ne={tuple(ne)} nb={tuple(nb)} at offset {offset} reaches past the {a.nbytes} bytes "
                         f"of {a!r}")
        fn = [None, lib.ggml_view_1d, lib.ggml_view_2d, lib.ggml_view_3d, lib.ggml_view_4d][len(ne)]
        return self._wrap(fn, a, *ne, *nb, int(offset))

    def view_strided(self, a: Tensor, ne: Sequence[int], nb: Sequence[int], offset: int = 0) -> Tensor:
        """A view whose rows may overlap, such as the windows of a convolution (row t = K*C floats from t*C on).

        ggml_view_* asserts that the view's element count fits in the source, which overlapping rows exceed, so the
        view is made as one element and then given its shape. The check here is the one that matters: every byte
        the view reaches lies inside ``a``. Rows (ne[0]) are contiguous; ``nb`` are the strides of dims 1.. in
        bytes. Read it (mul_mat, cont, ...); never write through it.
        """
        _t(a)
        ne = [int(n) for n in ne]
        nb = [int(x) for x in nb]
        _require(1 <= len(ne) <= 4, lambda: f"view_strided: 1 to 4 dims, got {ne}")
        _require(len(nb) == len(ne) - 1, lambda: f"view_strided: {len(ne)}-d view takes {len(ne) - 1} strides, got "
                                                 f"{len(nb)}")
        _require(min(ne) > 0 and min(nb, default=0) >= 0 and offset >= 0, lambda: f"view_strided: bad ne={ne} nb={nb}")
        _require(not is_quantized(a.type), lambda: f"view_strided: {a!r} is quantized")
        es = a.nb[0]
        reach = offset + ne[0] * es + sum((n - 1) * s for n, s in zip(ne[1:], nb))
        _require(reach <= a.nbytes, lambda: f"view_strided: ne={tuple(ne)} nb={tuple(nb)} at offset {offset} reaches "
                                            "byte "
                                    f"{reach}, past the {a.nbytes} bytes of {a!r}")
        out = self._wrap(lib.ggml_view_1d, a, 1, int(offset))
        ne4, nb4 = ne + [1] * (4 - len(ne)), [es] + nb + [0] * (3 - len(nb))
        for i in range(1, 4):  # strides of unit dims are never stepped, but keep them monotone like ggml does
            if nb4[i] == 0:
                nb4[i] = nb4[i - 1] * ne4[i - 1]
        for i in range(4):
            out.ptr.ne[i] = ne4[i]
            out.ptr.nb[i] = nb4[i]
        return out

    def permute(self, a: Tensor, a0: int, a1: int, a2: int, a3: int) -> Tensor:
        """ggml_permute: source dim i goes to position a_i."""
        _t(a)
        _require(sorted((a0, a1, a2, a3)) == [0, 1, 2, 3], lambda: f"permute: ({a0}, {a1}, {a2}, {a3}) is not a "
                                                                   "permutation of 0..3")
        return self._wrap(lib.ggml_permute, a, a0, a1, a2, a3)

    def transpose(self, a: Tensor) -> Tensor:
        return self._wrap(lib.ggml_transpose, _t(a))

    def cont(self, a: Tensor, *ne: int) -> Tensor:
        _t(a)
        if not ne:
            return self._wrap(lib.ggml_cont, a)
        _require(int(np.prod(ne)) == a.nelements, lambda: f"cont: {a!r} has {a.nelements} elements, ne={ne} has "
                                                          f"{int(np.prod(ne))}")
        fn = [None, lib.ggml_cont_1d, lib.ggml_cont_2d, lib.ggml_cont_3d, lib.ggml_cont_4d][len(ne)]
        return self._wrap(fn, a, *ne)

    def cpy(self, a: Tensor, b: Tensor) -> Tensor:
        _t(a), _t(b)
        _require(a.nelements == b.nelements, lambda: f"cpy: {a!r} and {b!r} differ in element count")
        return self._wrap(lib.ggml_cpy, a, b)

    def cast(self, a: Tensor, type) -> Tensor:
        return self._wrap(lib.ggml_cast, _t(a), int(as_type(type)))

    def repeat(self, a: Tensor, b: Tensor) -> Tensor:
        _t(a), _t(b)
        _require(_can_repeat(a, b), lambda: f"repeat: {a!r} does not tile {b!r}")
        return self._wrap(lib.ggml_repeat, a, b)

    def repeat_4d(self, a: Tensor, *ne: int) -> Tensor:
        """Tile ``a`` to shape ``ne`` (ggml order, 1 to 4 dims; each a multiple of a's), without a template tensor."""
        _t(a)
        ne = [int(n) for n in ne] + [1] * (4 - len(ne))
        _require(len(ne) == 4, lambda: f"repeat_4d: 1 to 4 dims, got {ne}")
        _require(all(n > 0 and an > 0 and n % an == 0 for n, an in zip(ne, a.ne)),
                 lambda: f"repeat_4d: {a!r} does not tile ne={tuple(ne)}")
        _require(a.type in (Type.F32, Type.F16, Type.BF16, Type.I32), lambda: f"repeat_4d: unsupported type {a!r}")
        return self._wrap(lib.ggml_repeat_4d, a, *ne)

    def concat(self, a: Tensor, b: Tensor, dim: int) -> Tensor:
        _t(a), _t(b)
        _require(0 <= dim < 4, lambda: f"concat: dim must be 0..3, got {dim}")
        _require(a.type == b.type, lambda: f"concat: types differ ({a!r}, {b!r})")
        for d in range(4):
            _require(d == dim or a.ne[d] == b.ne[d], lambda: f"concat along {dim}: ne[{d}] differs ({a!r}, {b!r})")
        return self._wrap(lib.ggml_concat, a, b, dim)

    def pad(self, a: Tensor, p0: int = 0, p1: int = 0, p2: int = 0, p3: int = 0) -> Tensor:
        """Zero padding at the end of each dim."""
        _t(a)
        _require(min(p0, p1, p2, p3) >= 0, "pad: negative padding")
        return self._wrap(lib.ggml_pad, a, p0, p1, p2, p3)

    def pad_ext(self, a: Tensor, lp0=0, rp0=0, lp1=0, rp1=0, lp2=0, rp2=0, lp3=0, rp3=0) -> Tensor:
        """Zero padding before and after each dim."""
        _t(a)
        _require(min(lp0, rp0, lp1, rp1, lp2, rp2, lp3, rp3) >= 0, "pad_ext: negative padding")
        return self._wrap(lib.ggml_pad_ext, a, lp0, rp0, lp1, rp1, lp2, rp2, lp3, rp3)

    def pad_reflect_1d(self, a: Tensor, p0: int, p1: int) -> Tensor:
        _t(a)
        _require(p0 >= 0 and p1 >= 0, "pad_reflect_1d: negative padding")
        _require(p0 < a.ne[0] and p1 < a.ne[0], lambda: f"pad_reflect_1d: padding ({p0}, {p1}) must be shorter than "
                                                        f"ne[0]={a.ne[0]}")
        _require(a.is_contiguous, lambda: f"pad_reflect_1d: {a!r} is not contiguous")
        _need_float(a, "pad_reflect_1d")
        return self._wrap(lib.ggml_pad_reflect_1d, a, p0, p1)

    # -- elementwise -------------------------------------------------------------------------------------------
    def _binary(self, fn, name: str, a: Tensor, b: Tensor) -> Tensor:
        _t(a), _t(b)
        _require(_can_repeat(b, a), lambda: f"{name}: {b!r} does not broadcast to {a!r}")
        _require(not is_quantized(a.type) and not is_quantized(b.type), lambda: f"{name}: quantized operands")
        return self._wrap(fn, a, b)

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(lib.ggml_add, "add", a, b)

    def sub(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(lib.ggml_sub, "sub", a, b)

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(lib.ggml_mul, "mul", a, b)

    def div(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(lib.ggml_div, "div", a, b)

    def scale(self, a: Tensor, s: float) -> Tensor:
        _t(a)
        _need_float(a, "scale")
        return self._wrap(lib.ggml_scale, a, float(s))

    def scale_bias(self, a: Tensor, s: float, b: float) -> Tensor:
        """s * a + b."""
        _t(a)
        _need_float(a, "scale_bias")
        return self._wrap(lib.ggml_scale_bias, a, float(s), float(b))

    def clamp(self, a: Tensor, lo: float, hi: float) -> Tensor:
        _t(a)
        _need_float(a, "clamp")
        return self._wrap(lib.ggml_clamp, a, float(lo), float(hi))

    def _unary(self, fn, name: str, a: Tensor, *args) -> Tensor:
        _t(a)
        _need_float(a, name, _FLOAT_TYPES)
        _require(_rows_contiguous(a), lambda: f"{name}: rows of {a!r} are not contiguous (ctx.cont first)")
        return self._wrap(fn, a, *args)

    def gelu(self, a: Tensor) -> Tensor:
        """tanh-approximated GELU (GPT-2's 'gelu_new')."""
        return self._unary(lib.ggml_gelu, "gelu", a)

    def gelu_erf(self, a: Tensor) -> Tensor:
        """exact GELU, 0.5 x (1 + erf(x / sqrt 2)) (torch's default)."""
        return self._unary(lib.ggml_gelu_erf, "gelu_erf", a)

    def silu(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_silu, "silu", a)

    def relu(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_relu, "relu", a)

    def tanh(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_tanh, "tanh", a)

    def sigmoid(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_sigmoid, "sigmoid", a)

    def exp(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_exp, "exp", a)

    def leaky_relu(self, a: Tensor, negative_slope: float) -> Tensor:
        _t(a)
        _need_float(a, "leaky_relu", (Type.F32, Type.F16))
        _require(_rows_contiguous(a), lambda: f"leaky_relu: rows of {a!r} are not contiguous")
        return self._wrap(lib.ggml_leaky_relu, a, float(negative_slope), False)

    def sqr(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_sqr, "sqr", a)

    def sqrt(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_sqrt, "sqrt", a)

    def log(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_log, "log", a)

    def sum_rows(self, a: Tensor) -> Tensor:
        _t(a)
        _need_float(a, "sum_rows")
        return self._wrap(lib.ggml_sum_rows, a)

    def mean(self, a: Tensor) -> Tensor:
        """Mean over ne[0]."""
        _t(a)
        _need_float(a, "mean")
        return self._wrap(lib.ggml_mean, a)

    def argmax(self, a: Tensor) -> Tensor:
        _t(a)
        _need_float(a, "argmax")
        _require(a.ne[2] == 1 and a.ne[3] == 1, lambda: f"argmax: needs a matrix, got {a!r}")
        return self._wrap(lib.ggml_argmax, a)

    # -- custom CPU ops ----------------------------------------------------------------------------------------
    def custom(self, fun, args: Sequence[Tensor], ne: Sequence[int], type="f32", userdata=None,
               n_tasks: int | None = None) -> Tensor:
        """ggml_custom_4d: a new tensor of ``type`` and ``ne`` that the CPU backend computes by calling the C
        function ``fun`` (a ``ggml_custom_op_t``: ``void fun(struct ggml_tensor * dst, int ith, int nth, void *
        userdata)``) once per thread; ``args`` become dst->src[0..]. ``userdata`` (a cdata pointer) and whatever
        it points to must outlive every compute of the graph. Other backends cannot compute custom ops."""
        args = [_t(a, f"custom argument {i}") for i, a in enumerate(args)]
        _require(len(args) <= lib.GGML_MAX_SRC, lambda: f"custom: at most {lib.GGML_MAX_SRC} arguments")
        ne = [int(n) for n in ne] + [1] * (4 - len(ne))
        _require(len(ne) == 4 and all(n >= 1 for n in ne), lambda: f"custom: bad shape {tuple(ne)}")
        fn = ffi.cast("ggml_custom_op_t", fun)
        srcs = ffi.new("struct ggml_tensor *[]", [a.ptr for a in args] or [ffi.NULL])
        ud = ffi.NULL if userdata is None else ffi.cast("void *", userdata)
        tasks = -1 if n_tasks is None else int(n_tasks)  # -1: GGML_N_TASKS_MAX, every thread
        self._room()
        return Tensor(lib.ggml_custom_4d(self._live(), int(as_type(type)), *ne, srcs, len(args), fn, tasks, ud), self)

    # -- linear algebra ----------------------------------------------------------------------------------------
    def mul_mat(self, a: Tensor, b: Tensor, precise: bool = False) -> Tensor:
        """a @ b in ggml's convention: result ne = (a.ne[1], b.ne[1], b.ne[2], b.ne[3]), contracting ne[0].

        With a weight ``W`` of numpy shape (out, in) and activations ``x`` of numpy shape (..., n, in),
        ``mul_mat(W, x)`` has numpy shape (..., n, out): the same as ``x @ W.T``.
        """
        _t(a, "a"), _t(b, "b")
        _require(a.ne[0] == b.ne[0], lambda: f"mul_mat: inner dims differ, {a!r} vs {b!r}")
        _require(b.ne[2] % a.ne[2] == 0 and b.ne[3] % a.ne[3] == 0, lambda: f"mul_mat: {a!r} does not broadcast over "
                                                                            f"{b!r}")
        _require(not a.nb[0] > a.nb[1], lambda: f"mul_mat: {a!r} is transposed (ctx.cont it first)")
        _require(b.type in (Type.F32, Type.F16), lambda: f"mul_mat: b must be F32 or F16, got {b!r}")
        out = self._wrap(lib.ggml_mul_mat, a, b)
        if precise:
            lib.ggml_mul_mat_set_prec(out.ptr, lib.GGML_PREC_F32)
        return out

    # -- normalisation -----------------------------------------------------------------------------------------
    def norm(self, a: Tensor, eps: float) -> Tensor:
        """(a - mean) / sqrt(var + eps) over ne[0] (LayerNorm without affine)."""
        _t(a)
        _need_float(a, "norm")
        _require(a.nb[0] == 4, lambda: f"norm: elements of {a!r} are not contiguous")
        return self._wrap(lib.ggml_norm, a, float(eps))

    def rms_norm(self, a: Tensor, eps: float) -> Tensor:
        _t(a)
        _need_float(a, "rms_norm")
        _require(a.nb[0] == 4, lambda: f"rms_norm: elements of {a!r} are not contiguous")
        return self._wrap(lib.ggml_rms_norm, a, float(eps))

    def l2_norm(self, a: Tensor, eps: float) -> Tensor:
        """a / max(||a||, eps) over ne[0]."""
        _t(a)
        _need_float(a, "l2_norm")
        _require(a.nb[0] == 4, lambda: f"l2_norm: elements of {a!r} are not contiguous")
        return self._wrap(lib.ggml_l2_norm, a, float(eps))

    def group_norm(self, a: Tensor, n_groups: int, eps: float) -> Tensor:
        """GroupNorm without affine; groups split ne[2] (channels), statistics over ne[0], ne[1] and the group.

        For (channels, time) data of numpy shape (B, C, T) use a tensor of ne (T, 1, C, B).
        """
        _t(a)
        _need_float(a, "group_norm")
        _require(a.is_contiguous, lambda: f"group_norm: {a!r} is not contiguous")
        _require(n_groups > 0 and a.ne[2] % n_groups == 0, lambda: f"group_norm: {n_groups} groups do not split "
                                                                   f"ne[2]={a.ne[2]}")
        return self._wrap(lib.ggml_group_norm, a, int(n_groups), float(eps))

    # -- attention ---------------------------------------------------------------------------------------------
    def soft_max(self, a: Tensor) -> Tensor:
        _t(a)
        _need_float(a, "soft_max")
        _require(a.is_contiguous, lambda: f"soft_max: {a!r} is not contiguous")
        return self._wrap(lib.ggml_soft_max, a)

    def soft_max_ext(self, a: Tensor, mask: Tensor | None, scale: float, max_bias: float = 0.0) -> Tensor:
        """softmax(a * scale + mask) over ne[0]; mask (F16/F32) broadcasts over ne[2], ne[3]."""
        _t(a)
        _need_float(a, "soft_max_ext")
        _require(a.is_contiguous, lambda: f"soft_max_ext: {a!r} is not contiguous")
        if mask is not None:
            _t(mask, "mask")
            _require(mask.type in (Type.F16, Type.F32), lambda: f"soft_max_ext: mask must be F16/F32, got {mask!r}")
            _require(mask.is_contiguous, lambda: f"soft_max_ext: mask {mask!r} is not contiguous")
            _require(mask.ne[0] == a.ne[0] and mask.ne[1] >= a.ne[1],
                     lambda: f"soft_max_ext: mask {mask!r} does not cover {a!r}")
            _require(a.ne[2] % mask.ne[2] == 0 and a.ne[3] % mask.ne[3] == 0,
                     lambda: f"soft_max_ext: mask {mask!r} does not broadcast over {a!r}")
        _require(max_bias == 0 or mask is not None, "soft_max_ext: max_bias (ALiBi) needs a mask")
        return self._wrap(lib.ggml_soft_max_ext, a, mask.ptr if mask is not None else ffi.NULL, float(scale),
                          float(max_bias))

    def diag_mask_inf(self, a: Tensor, n_past: int) -> Tensor:
        _t(a)
        _need_float(a, "diag_mask_inf")
        return self._wrap(lib.ggml_diag_mask_inf, a, int(n_past))

    def flash_attn_ext(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                       max_bias: float = 0.0, logit_softcap: float = 0.0, precise: bool = True) -> Tensor:
        """Fused softmax(scale * q k^T + mask) v.

        q: ne (D, n_q, H, B); k, v: ne (D, n_kv, H_kv, B) with H % H_kv == 0; mask: F16 ne (n_kv, >= n_q, 1|H, 1|B).
        Result ne is (D_v, H, n_q, B): heads and queries swapped, ready to be reshaped to (D_v*H, n_q, B).
        """
        _t(q, "q"), _t(k, "k"), _t(v, "v")
        _require(k.ne[0] == q.ne[0], lambda: f"flash_attn_ext: head size of q {q!r} and k {k!r} differ")
        _require(q.ne[2] % k.ne[2] == 0, lambda: f"flash_attn_ext: {q.ne[2]} query heads are not a multiple of "
                                                 f"{k.ne[2]} kv heads")
        _require(q.ne[3] == k.ne[3] == v.ne[3], "flash_attn_ext: batch (ne[3]) of q, k, v differ")
        _require(k.ne[1] == v.ne[1] and k.ne[2] == v.ne[2], lambda: f"flash_attn_ext: k {k!r} and v {v!r} do not match")
        _require(q.type == Type.F32, lambda: f"flash_attn_ext: q must be F32, got {q!r}")
        if mask is not None:
            _t(mask, "mask")
            _require(mask.type == Type.F16, lambda: f"flash_attn_ext: mask must be F16, got {mask!r}")
            _require(mask.is_contiguous, "flash_attn_ext: mask is not contiguous")
            _require(mask.ne[0] == k.ne[1] and mask.ne[1] >= q.ne[1],
                     lambda: f"flash_attn_ext: mask {mask!r} must be (n_kv={k.ne[1]}, >= n_q={q.ne[1]})")
            _require(q.ne[2] % mask.ne[2] == 0 and q.ne[3] % mask.ne[3] == 0,
                     lambda: f"flash_attn_ext: mask {mask!r} does not broadcast over the heads/batch of {q!r}")
        _require(max_bias == 0 or mask is not None, "flash_attn_ext: max_bias (ALiBi) needs a mask")
        out = self._wrap(lib.ggml_flash_attn_ext, q, k, v, mask.ptr if mask is not None else ffi.NULL,
                         float(scale), float(max_bias), float(logit_softcap))
        if precise:
            lib.ggml_flash_attn_ext_set_prec(out.ptr, lib.GGML_PREC_F32)
        return out

    # -- convolution -------------------------------------------------------------------------------------------
    def im2col(self, kernel: Tensor, x: Tensor, s0: int, s1: int, p0: int, p1: int, d0: int, d1: int,
               is_2d: bool, dst_type=Type.F32) -> Tensor:
        """Unfold ``x`` for a convolution with ``kernel``'s shape. 1-D: kernel ne (K, C_in, C_out), x ne (L, C_in, B)
        -> ne (K*C_in, L_out, B); then mul_mat(kernel reshaped to (K*C_in, C_out), cols) is the convolution."""
        _t(kernel, "kernel"), _t(x, "x")
        _require(min(s0, d0) > 0 and p0 >= 0, lambda: f"im2col: bad stride/dilation/padding s0={s0} d0={d0} p0={p0}")
        dst = as_type(dst_type)
        _require(dst in (Type.F32, Type.F16), "im2col: dst_type must be F32 or F16")
        _need_float(x, "im2col", (Type.F32, Type.F16))
        if is_2d:
            _require(min(s1, d1) > 0 and p1 >= 0, lambda: f"im2col: bad s1={s1} d1={d1} p1={p1}")
            _require(kernel.ne[2] == x.ne[2], lambda: f"im2col: channels of kernel {kernel!r} and input {x!r} differ")
            oh = (x.ne[1] + 2 * p1 - d1 * (kernel.ne[1] - 1) - 1) // s1 + 1
            _require(oh > 0, lambda: f"im2col: input {x!r} is too small for kernel {kernel!r}")
        else:
            _require(kernel.ne[1] == x.ne[1], lambda: f"im2col: channels of kernel {kernel!r} and input {x!r} differ")
            _require(x.ne[3] == 1, lambda: f"im2col (1-D): ne[3] of {x!r} must be 1")
        ow = (x.ne[0] + 2 * p0 - d0 * (kernel.ne[0] - 1) - 1) // s0 + 1
        _require(ow > 0, lambda: f"im2col: input {x!r} is too small for kernel {kernel!r}")
        return self._wrap(lib.ggml_im2col, kernel, x, s0, s1, p0, p1, d0, d1, bool(is_2d), int(dst))

    def conv_transpose_1d(self, kernel: Tensor, x: Tensor, s0: int, p0: int = 0, d0: int = 1) -> Tensor:
        """kernel ne (K, C_out, C_in) (torch's (C_in, C_out, K) weight), x ne (L, C_in) -> ne ((L-1)*s0+K, C_out).
        ggml 0.20.2 has no padding or dilation here: crop the result with a view for torch's padding."""
        _t(kernel, "kernel"), _t(x, "x")
        _require(p0 == 0 and d0 == 1, "conv_transpose_1d: ggml supports only p0=0, d0=1 (crop the output instead)")
        _require(s0 > 0, "conv_transpose_1d: stride must be positive")
        _require(x.ne[2] == 1 and x.ne[3] == 1, lambda: f"conv_transpose_1d: input must be 2-D (L, C_in), got {x!r}")
        _require(kernel.ne[2] == x.ne[1] and kernel.ne[3] == 1,
                 lambda: f"conv_transpose_1d: kernel {kernel!r} expects {kernel.ne[2]} input channels, input {x!r}")
        _need_float(kernel, "conv_transpose_1d", (Type.F32, Type.F16))
        _need_float(x, "conv_transpose_1d")
        return self._wrap(lib.ggml_conv_transpose_1d, kernel, x, s0, p0, d0)

    def interpolate(self, a: Tensor, ne: Sequence[int], mode: str = "nearest") -> Tensor:
        """Resize to ``ne`` (ggml order); nearest/bilinear/bicubic over ne[0], ne[1] (and nearest over 2, 3)."""
        _t(a)
        _need_float(a, "interpolate")
        modes = {"nearest": lib.GGML_SCALE_MODE_NEAREST, "bilinear": lib.GGML_SCALE_MODE_BILINEAR,
                 "bicubic": lib.GGML_SCALE_MODE_BICUBIC}
        if mode not in modes:
            raise ValueError(f"interpolate: mode must be one of {sorted(modes)}, got {mode!r}")
        ne = list(ne) + [1] * (4 - len(ne))
        _require(all(n > 0 for n in ne), lambda: f"interpolate: bad target ne={tuple(ne)}")
        return self._wrap(lib.ggml_interpolate, a, *[int(n) for n in ne], modes[mode])

    # -- embeddings and rows -----------------------------------------------------------------------------------
    def get_rows(self, a: Tensor, ids: Tensor) -> Tensor:
        """Rows ``ids`` (I32, ne (n, B1, B2)) of ``a`` (ne (D, rows, B1, B2)) -> ne (D, n, B1, B2), as F32."""
        _t(a), _t(ids, "ids")
        _require(ids.type == Type.I32, lambda: f"get_rows: ids must be I32, got {ids!r}")
        _require(a.ne[2] == ids.ne[1] and a.ne[3] == ids.ne[2] and ids.ne[3] == 1,
                 lambda: f"get_rows: ids {ids!r} do not match the batch dims of {a!r}")
        return self._wrap(lib.ggml_get_rows, a, ids)

    def set_rows(self, a: Tensor, b: Tensor, ids: Tensor) -> Tensor:
        """Write rows of ``b`` into ``a`` at ``ids`` (in place; returns the view to depend on)."""
        _t(a), _t(b), _t(ids, "ids")
        _require(a.ne[0] == b.ne[0] and a.ne[2] == b.ne[2] and a.ne[3] == b.ne[3],
                 lambda: f"set_rows: rows of {b!r} do not fit {a!r}")
        _require(b.ne[1] == ids.ne[0] and b.ne[2] % ids.ne[1] == 0 and b.ne[3] % ids.ne[2] == 0 and ids.ne[3] == 1,
                 lambda: f"set_rows: ids {ids!r} do not match {b!r}")
        _require(b.type in (Type.F32, Type.F16), lambda: f"set_rows: source must be F32/F16, got {b!r}")
        _require(ids.type in (Type.I32, Type.I64), lambda: f"set_rows: ids must be I32/I64, got {ids!r}")
        _require(bool(lib.ggml_is_contiguous_rows(a.ptr)) and bool(lib.ggml_is_contiguous_rows(b.ptr)),
                 "set_rows: rows must be contiguous")
        return self._wrap(lib.ggml_set_rows, a, b, ids)

    def timestep_embedding(self, timesteps: Tensor, dim: int, max_period: int = 10000) -> Tensor:
        """[cos | sin] sinusoidal embedding of 1-D F32 timesteps -> ne (dim, n)."""
        _t(timesteps)
        _need_float(timesteps, "timestep_embedding")
        _require(timesteps.n_dims == 1, lambda: f"timestep_embedding: timesteps must be 1-D, got {timesteps!r}")
        _require(dim > 0, "timestep_embedding: dim must be positive")
        return self._wrap(lib.ggml_timestep_embedding, timesteps, int(dim), int(max_period))

    # -- rotary embeddings and gated units ----------------------------------------------------------------------
    def rope_neox(self, a: Tensor, positions: Tensor, n_dims: int, freq_base: float = 10000.0) -> Tensor:
        """Rotary position embedding in the rotate-half ("NeoX") form on the first ``n_dims`` of each row:
        with h = n_dims/2 and theta_i = pos * freq_base^(-2i/n_dims), element i becomes x_i cos - x_(i+h) sin and
        element i+h becomes x_i sin + x_(i+h) cos; elements n_dims.. are copied.

        a: F32 ne (D, H, T, B) (rows contiguous, any other strides); positions: I32 ne (T).
        """
        _t(a), _t(positions, "positions")
        _need_float(a, "rope_neox")
        _require(a.nb[0] == 4, lambda: f"rope_neox: elements of {a!r} are not contiguous")
        _require(positions.type == Type.I32 and positions.n_dims == 1,
                 lambda: f"rope_neox: positions must be a 1-D I32 tensor, got {positions!r}")
        _require(positions.ne[0] == a.ne[2], lambda: f"rope_neox: {positions.ne[0]} positions for ne[2]={a.ne[2]} of "
                                                     f"{a!r}")
        _require(0 < n_dims <= a.ne[0] and n_dims % 2 == 0,
                 lambda: f"rope_neox: n_dims={n_dims} must be even and within ne[0]={a.ne[0]}")
        _require(freq_base > 0, "rope_neox: freq_base must be positive")
        # ext_factor 0, attn_factor 1, freq_scale 1: plain RoPE (the YaRN parameters then have no effect)
        return self._wrap(lib.ggml_rope_ext, a, positions, ffi.NULL, int(n_dims), lib.GGML_ROPE_TYPE_NEOX, 0,
                          float(freq_base), 1.0, 0.0, 1.0, 0.0, 0.0)

    def geglu_erf(self, a: Tensor, swapped: bool = False) -> Tensor:
        """Gated exact GELU over halves of ne[0]: gelu_erf(first half) * second half, or with ``swapped``
        first half * gelu_erf(second half) (x-transformers' GLU: ``x, gate = proj.chunk(2); x * gelu(gate)``)."""
        _t(a)
        _need_float(a, "geglu_erf", (Type.F32, Type.F16))
        _require(a.ne[0] % 2 == 0, lambda: f"geglu_erf: ne[0] of {a!r} must be even")
        _require(_rows_contiguous(a), lambda: f"geglu_erf: rows of {a!r} are not contiguous (ctx.cont first)")
        fn = lib.ggml_geglu_erf_swapped if swapped else lib.ggml_geglu_erf
        return self._wrap(fn, a)

    # -- escape hatch ------------------------------------------------------------------------------------------
    def op(self, name: str, *args) -> Tensor:
        """Any ``ggml_<name>(ctx, ...)`` that returns a tensor, unchecked: wrong shapes abort the process."""
        fn = getattr(lib, "ggml_" + name, None)
        if fn is None:
            raise AttributeError(f"ggml has no function ggml_{name}")
        return self._wrap(fn, *args)


__all__ = ["Context", "NUMPY_DTYPES"]
