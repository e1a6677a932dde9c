"""``Context``: a ggml context, and the graph-building ops, each checked in Python first.

ggml asserts its preconditions and aborts the process when one fails, so every op here checks the conditions that
ggml (at graph-build time) and its CPU kernels (at compute time) assert, and raises ShapeError/TypeError instead:
operand types (binary ops take one float type, or an F32 second operand: ggml-cpu's binary_op), element layouts
(most kernels step through ne[0] element by element, some through all rows by nb[1]), scalar arguments (finite;
epsilons >= 0), and sizes (no result that is empty or whose byte size overflows; in a ``no_alloc=False`` context,
none that would not fit). Ops take and return ``Tensor``; tensors of other contexts (weights, say) are fine as
operands, and the context remembers them: a graph over a closed context raises ClosedError. ``ctx.op("name",
...)`` reaches any other ``ggml_<name>`` unchecked.
"""
from __future__ import annotations

import math
import threading
from typing import Sequence

import numpy as np

from . import lifetime
from .dtypes import NUMPY_DTYPES, Type, as_type, is_quantized, type_name
from .errors import ClosedError, OutOfContextMemory, OutOfMemory, ShapeError
from .raw import ffi, lib
from .tensor import Tensor

_FLOAT_TYPES = (Type.F32, Type.F16, Type.BF16)
# The largest tensor (in bytes or elements) pyggml lets reach ggml: far beyond any real allocation, far below where
# ggml's size_t/int64 stride arithmetic (nb[i] = nb[i-1] * ne[i-1], offsets i*nb) could overflow.
MAX_BYTES = 1 << 56
# Binary ops (add, sub, mul, div): the (a, b) type pairs the CPU kernels implement (ggml-cpu binary-ops.cpp
# binary_op: the result has a's type). Anything else aborts the process at compute time.
_BINARY_TYPES = {(Type.F32, Type.F32), (Type.F16, Type.F16), (Type.BF16, Type.BF16), (Type.F16, Type.F32),
                 (Type.BF16, Type.F32)}
_REPEAT_TYPES = (Type.F32, Type.F16, Type.BF16, Type.I16, Type.I32)  # ggml-cpu repeat
_NOT_STORABLE = (Type.Q8_K, Type.Q8_1)  # matmul intermediates: quantized only as dot-product operands
_allocate = ffi.new_allocator(should_clear_after_alloc=False)  # lazily mapped pages, as malloc gives


def _number(x, what: str, op: str) -> float:
    """A scalar argument as float; NaN refused (it would silently poison the result)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{op}: {what} must be a number, got {x!r}")
    v = float(x)
    if math.isnan(v):
        raise ShapeError(f"{op}: {what} is NaN")
    return v


def _finite(x, what: str, op: str, minimum: float | None = None, positive: bool = False) -> float:
    """A scalar argument as float: finite (and >= minimum / > 0), else ShapeError naming the op."""
    v = _number(x, what, op)
    if not math.isfinite(v):
        raise ShapeError(f"{op}: {what} must be finite, got {x!r}")
    if minimum is not None and v < minimum:
        raise ShapeError(f"{op}: {what} must be >= {minimum:g}, got {x!r}")
    if positive and v <= 0:
        raise ShapeError(f"{op}: {what} must be > 0, got {x!r}")
    return v


def _int(x, what: str, op: str, minimum: int | None = None) -> int:
    """An integer argument (numpy integers too; bools and floats refused), >= minimum when given."""
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{op}: {what} must be an integer, got {x!r}")
    v = int(x)
    if minimum is not None and v < minimum:
        raise ShapeError(f"{op}: {what} must be >= {minimum}, got {v}")
    if abs(v) >= MAX_BYTES:
        raise ShapeError(f"{op}: {what}={v} is out of range")
    return v


def _elems_contiguous(t: Tensor) -> bool:
    """ne[0] is stepped element by element (nb[0] is the type's size): what most CPU kernels assume."""
    p = t.ptr
    return p.nb[0] == lib.ggml_type_size(p.type)


def _packed(t: Tensor) -> bool:
    """Contiguous with element-sized steps along ne[0] too (ggml_is_contiguous lets a dim of size 1 have any
    stride, the kernels that read rows as arrays do not)."""
    p = t.ptr
    return p.nb[0] == lib.ggml_type_size(p.type) and bool(lib.ggml_is_contiguous(p))


def _padded_1d(t: Tensor) -> bool:
    """ggml_is_padded_1d: rows may be padded, the dims above them not (what ggml_scale asserts)."""
    p = t.ptr
    return (p.nb[0] == lib.ggml_type_size(p.type) and p.nb[2] == p.nb[1] * p.ne[1]
            and p.nb[3] == p.nb[2] * p.ne[2])


def _row_bytes(type_, n0: int) -> int:
    return lib.ggml_type_size(int(type_)) * (n0 // lib.ggml_blck_size(int(type_)))


def _whole_blocks(type_, n0: int, op: str) -> None:
    blck = lib.ggml_blck_size(int(type_))
    _require(n0 % blck == 0, lambda: f"{op}: {type_name(type_)} stores blocks of {blck} along ne[0]: {n0} is not a "
                                     "multiple")


def _base(a: Tensor):
    """The tensor whose memory ``a`` views (itself when no view) and a's byte offset into it."""
    p = a.ptr
    if p.view_src != ffi.NULL:
        return p.view_src, int(p.view_offs)
    return p, 0


def _copyable(a: Tensor, dst, op: str, b: Tensor | None = None) -> None:
    """The conversions ggml-cpu's dup (cpy, cont, cast) implements, with the layouts each needs."""
    src, dst = a.type, as_type(dst)
    if src == dst:
        _require(not is_quantized(src) or (a.is_contiguous and (b is None or b.is_contiguous)),
                 lambda: f"{op}: {type_name(src)} data is copied whole: {a!r} must be contiguous")
        return
    if src in _FLOAT_TYPES and dst in _FLOAT_TYPES or (src, dst) in ((Type.F32, Type.I32), (Type.I32, Type.F32)):
        return
    if src in _FLOAT_TYPES and is_quantized(dst):
        _require(lib.ggml_get_type_traits_cpu(int(dst)).from_float != ffi.NULL and dst not in _NOT_STORABLE,
                 lambda: f"{op}: the CPU cannot quantize to {type_name(dst)}")
        _require(_elems_contiguous(a) and (b is None or b.is_contiguous),
                 lambda: f"{op}: quantizing needs contiguous elements of {a!r} and a contiguous destination")
        _whole_blocks(dst, a.ne[0], op)
        return
    if is_quantized(src) and dst == Type.F32:
        _require(lib.ggml_get_type_traits(int(src)).to_float != ffi.NULL,
                 lambda: f"{op}: the CPU cannot dequantize {type_name(src)}")
        _require(a.is_contiguous and (b is None or b.is_contiguous),
                 lambda: f"{op}: dequantizing {a!r} needs contiguous source and destination")
        return
    raise ShapeError(f"{op}: ggml cannot convert {type_name(src)} to {type_name(dst)} ({a!r})")


def _dims(ne, op: str, allow_zero: bool = False) -> list[int]:
    """A shape in ggml order: 1 to 4 positive integers whose product stays in range."""
    try:
        ne = [_int(n, "dimension", op) for n in ne]
    except TypeError:
        raise TypeError(f"{op}: a shape is integers, got {tuple(ne) if isinstance(ne, (list, tuple)) else ne!r}") \
            from None
    if not 1 <= len(ne) <= 4:
        raise ShapeError(f"{op}: a ggml tensor has 1 to 4 dimensions, got ne={tuple(ne)}")
    low = 0 if allow_zero else 1
    if any(n < low for n in ne):
        raise ShapeError(f"{op}: dimensions must be >= {low}, got ne={tuple(ne)} (ggml's allocators and kernels "
                         "do not take empty tensors)" if low else f"{op}: negative dimension in ne={tuple(ne)}")
    if math.prod(ne) >= MAX_BYTES:
        raise ShapeError(f"{op}: ne={tuple(ne)} has {math.prod(ne)} elements: too large")
    return ne


def _t(x, what: str = "operand") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a pyggml Tensor, not {type(x).__name__}")
    return x


def _can_repeat(b: Tensor, a: Tensor) -> bool:
    """ggml_can_repeat(b, a): b broadcasts to a. ggml also lets an empty b "broadcast", and then its kernels divide
    by b's zero extent: refused here."""
    return all(bn > 0 and an > 0 and an % bn == 0 for an, bn in zip(a.ne, b.ne))


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


class _Scratch:
    """A small no_alloc ggml context (per thread) in which an op is built once to learn its result's size."""

    def __init__(self):
        self.size = lib.ggml_tensor_overhead() * 16 + 4096
        self._local = threading.local()

    def get(self):
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = Context(self.size, no_alloc=True)
        lib.ggml_reset(ctx.ptr)
        return ctx.ptr

    def close(self) -> None:
        ctx = getattr(self._local, "ctx", None)
        if ctx is not None:
            ctx.close()


def _result_bytes(scratch: _Scratch, fn, raw_args) -> int:
    ptr = scratch.get()
    out = fn(ptr, *raw_args)
    if out == ffi.NULL:
        return 0
    _check_result(out)
    return 0 if out.view_src != ffi.NULL else int(lib.ggml_nbytes(out))


def _check_result(p) -> None:
    """An op's result must be neither empty (ggml's graph allocator asserts on those; an empty view is fine, it
    is never allocated) nor of a size that overflows."""
    n = p.ne[0] * p.ne[1] * p.ne[2] * p.ne[3]
    if min(p.ne[0], p.ne[1], p.ne[2], p.ne[3]) < 0 or (n == 0 and p.view_src == ffi.NULL):
        raise ShapeError(f"{_op_name(p)}: the result would be empty (ne={tuple(p.ne)}); ggml cannot compute "
                         "empty tensors")
    if n * lib.ggml_type_size(p.type) >= MAX_BYTES:
        raise ShapeError(f"{_op_name(p)}: the result (ne={tuple(p.ne)}) is too large")


def _op_name(p) -> str:
    from .raw import string
    return string(lib.ggml_op_desc(p)).lower()


class Context:
    """A ggml context.

    With ``no_alloc=True`` (the default) it holds tensor and graph descriptions only; their memory comes from a
    backend (``Backend.alloc_tensors(ctx)`` for weights, ``Backend.compute(graph)`` for intermediate results).
    With ``no_alloc=False`` tensors get host memory from the context itself (``mem_size`` must cover it).
    """

    def __init__(self, mem_size: int | None = None, *, no_alloc: bool = True, max_tensors: int = 8192,
                 graph_size: int = 16384):
        self.ptr, self._open, self._why_closed = ffi.NULL, False, "this Context was closed"
        self._deps: set[Context] = set()   # other contexts whose tensors this one's ops read
        self._released: str | None = None  # why this context's tensor data is gone (its backend buffer was freed)
        self._scratch = None               # no_alloc=False: a no_alloc context that sizes each op's result first
        if mem_size is None:
            max_tensors = _int(max_tensors, "max_tensors", "Context", 0)
            graph_size = _int(graph_size, "graph_size", "Context", 0)
            mem_size = (lib.ggml_tensor_overhead() * max_tensors
                        + lib.ggml_graph_overhead_custom(graph_size, False) + 4096)
        if isinstance(mem_size, bool) or not isinstance(mem_size, (int, np.integer)):
            raise TypeError(f"Context: mem_size must be an integer, got {mem_size!r}")
        mem_size = int(mem_size)
        if mem_size <= 0:
            raise ValueError("mem_size must be positive")
        if mem_size >= MAX_BYTES:
            raise OutOfMemory(f"Context: mem_size={mem_size} bytes cannot be allocated")
        self.no_alloc = bool(no_alloc)
        # the context's memory comes from here, not from ggml_init, which aborts when malloc fails
        align = 64
        try:
            self._mem = _allocate("char[]", mem_size + align)
        except MemoryError:
            raise OutOfMemory(f"Context: could not allocate mem_size={mem_size} bytes") from None
        start = int(ffi.cast("uintptr_t", self._mem))
        buf = self._mem + (-start) % align
        self.ptr = lib.ggml_init({"mem_size": mem_size, "mem_buffer": buf, "no_alloc": self.no_alloc})
        if self.ptr == ffi.NULL:
            raise OutOfMemory(f"ggml_init could not get {mem_size} bytes")
        self._open = True
        self._start = int(ffi.cast("uintptr_t", buf))
        lifetime.register(self, self._start, mem_size)

    # -- lifetime ----------------------------------------------------------------------------------------------
    def close(self, reason: str | None = None) -> None:
        """Free the context: its tensors and graphs (and any Tensor or Graph object over them) are unusable
        afterwards; ``reason`` is what ClosedError then says."""
        if getattr(self, "_open", False):
            self._open = False
            if reason:
                self._why_closed = reason
            lifetime.unregister(self._start)
            if self._scratch is not None:
                self._scratch.close()
                self._scratch = None
            lib.ggml_free(self.ptr)
            self.ptr = ffi.NULL
            self._mem = None
            self._deps = set()

    @property
    def closed(self) -> bool:
        return not self._open

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def _closed_message(self) -> str:
        return self._why_closed

    def _live(self):
        if not self._open:
            raise ClosedError(self._why_closed)
        return self.ptr

    def dependencies(self) -> set:
        """This context and every context whose tensors its ops read, transitively."""
        seen, todo = {self}, [self]
        while todo:
            for d in todo.pop()._deps:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

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

    def _track(self, *tensors: Tensor) -> None:
        """Keep alive the other contexts whose tensors an op here reads."""
        for t in tensors:
            if t.owner is not self:
                self._deps.add(t.owner)

    def _wrap(self, fn, *args) -> Tensor:
        ptr = self._live()
        raw = []
        for a in args:
            if isinstance(a, Tensor):
                raw.append(a.ptr)           # ClosedError for a tensor of a closed context
                self._track(a)
            else:
                raw.append(a)
        self._room()
        if not self.no_alloc:
            # ggml would put the result's data in this context and abort when it does not fit: size it first
            self._room(_result_bytes(self._scratch_ctx(), fn, raw), "the result")
        out = fn(ptr, *raw)
        if out == ffi.NULL:
            raise ShapeError(f"ggml returned no tensor for {getattr(fn, '__name__', fn)}")
        _check_result(out)
        return Tensor(out, self)

    def _scratch_ctx(self):
        if self._scratch is None:
            self._scratch = _Scratch()
        return self._scratch

    # -- tensors -----------------------------------------------------------------------------------------------
    def new_tensor(self, type, ne: Sequence[int], name: str | None = None) -> Tensor:
        """A new tensor of ggml type ``type`` and shape ``ne`` (ggml order, 1 to 4 dims). An empty tensor (a 0 in
        ``ne``) may be allocated and viewed, but not be a graph input nor the result of an op (ggml's graph
        allocator asserts on those)."""
        t = as_type(type)
        ne = _dims(ne, "new_tensor", allow_zero=True)
        blck = lib.ggml_blck_size(int(t))
        if blck == 0 or lib.ggml_type_size(int(t)) == 0:
            raise ShapeError(f"new_tensor: {type_name(t)} is not a usable tensor type (removed from ggml)")
        if ne[0] % blck:
            raise ShapeError(f"{type_name(t)} stores blocks of {blck}: ne[0]={ne[0]} is not a multiple")
        nbytes = lib.ggml_type_size(int(t)) * (ne[0] // blck) * math.prod(ne[1:])
        if nbytes >= MAX_BYTES:
            raise ShapeError(f"new_tensor: a {type_name(t)} tensor of ne={tuple(ne)} takes {nbytes} bytes: too large")
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
        ne = _dims(ne[0] if len(ne) == 1 and isinstance(ne[0], (tuple, list)) else ne, "reshape", allow_zero=True)
        _require(a.is_contiguous, lambda: f"reshape: {a!r} is not contiguous (ctx.cont first)")
        _require(math.prod(ne) == a.nelements, lambda: f"reshape: {a!r} has {a.nelements} elements, ne={tuple(ne)} "
                                                       f"has {math.prod(ne)}")
        _whole_blocks(a.type, ne[0], "reshape")
        fn = [None, lib.ggml_reshape_1d, lib.ggml_reshape_2d, lib.ggml_reshape_3d, lib.ggml_reshape_4d][len(ne)]
        return self._wrap(fn, a, *ne)

    def view(self, a: Tensor, ne: Sequence[int], nb: Sequence[int] | None = None, offset: int = 0) -> Tensor:
        """ggml_view_Nd: ``ne`` in ggml order, ``nb`` the strides of dims 1.. in bytes (default: a's strides); ne[0]
        is stepped by the element size."""
        _t(a)
        ne = _dims(ne, "view", allow_zero=True)
        nb = list(a.nb[1:len(ne)]) if nb is None else [_int(x, "stride", "view", 0) for x in nb]
        _require(len(nb) == len(ne) - 1, lambda: f"view: {len(ne)}-d view takes {len(ne) - 1} strides, got {len(nb)}")
        offset = _int(offset, "offset", "view", 0)
        # a view steps through ne[0] by the element size, whatever a's nb[0]: of a transposed or permuted tensor
        # it would read other elements than a's
        _require(ne[0] == 1 or _elems_contiguous(a),
                 lambda: f"view: elements of {a!r} are not contiguous (nb[0]={a.nb[0]}), a view would step through "
                         "them by the element size: ctx.cont first, or view the tensor it permutes")
        _whole_blocks(a.type, ne[0], "view")
        _require(not is_quantized(a.type) or offset % lib.ggml_type_size(int(a.type)) == 0,
                 lambda: f"view: offset {offset} splits a {type_name(a.type)} block of {a!r}")
        row = _row_bytes(a.type, ne[0])
        reach = offset + (row + sum((n - 1) * s for n, s in zip(ne[1:], nb)) if 0 not in ne else 0)
        _require(reach <= a.nbytes,
                 lambda: f"view: ne={tuple(ne)} nb={tuple(nb)} at offset {offset} reaches past the {a.nbytes} bytes "
                         f"of {a!r}")
        # ggml_view_* also asserts that the view's elements, counted as if contiguous, fit in the viewed tensor's
        # memory (overlapping rows, as a convolution's windows, need view_strided)
        base, base_offset = _base(a)
        _require(base_offset + offset + row * math.prod(ne[1:]) <= lib.ggml_nbytes(base),
                 lambda: f"view: ne={tuple(ne)} holds more elements than {a!r} has from offset {offset} (overlapping "
                         "rows: use view_strided)")
        fn = [None, lib.ggml_view_1d, lib.ggml_view_2d, lib.ggml_view_3d, lib.ggml_view_4d][len(ne)]
        return self._wrap(fn, a, *ne, *nb, offset)

    def view_strided(self, a: Tensor, ne: Sequence[int], nb: Sequence[int], offset: int = 0) -> Tensor:
        """A view whose rows may overlap, such as the windows of a convolution (row t = K*C floats from t*C on).

        ggml_view_* asserts that the view's element count fits in the source, which overlapping rows exceed, so the
        view is made as one element and then given its shape. The check here is the one that matters: every byte
        the view reaches lies inside ``a``. Rows (ne[0]) are contiguous; ``nb`` are the strides of dims 1.. in
        bytes. Read it (mul_mat, cont, ...); never write through it.
        """
        _t(a)
        ne = _dims(ne, "view_strided")
        nb = [_int(x, "stride", "view_strided", 0) for x in nb]
        offset = _int(offset, "offset", "view_strided", 0)
        _require(len(nb) == len(ne) - 1, lambda: f"view_strided: {len(ne)}-d view takes {len(ne) - 1} strides, got "
                                                 f"{len(nb)}")
        _require(not is_quantized(a.type), lambda: f"view_strided: {a!r} is quantized")
        es = a.nb[0]
        _require(es == lib.ggml_type_size(a.ptr.type), lambda: f"view_strided: elements of {a!r} are not contiguous")
        _require(offset % es == 0, lambda: f"view_strided: offset {offset} is not a multiple of the element size {es}")
        reach = offset + ne[0] * es + sum((n - 1) * s for n, s in zip(ne[1:], nb))
        _require(reach <= a.nbytes, lambda: f"view_strided: ne={tuple(ne)} nb={tuple(nb)} at offset {offset} reaches "
                                            f"byte {reach}, past the {a.nbytes} bytes of {a!r}")
        out = self._wrap(lib.ggml_view_1d, a, 1, offset)
        ne4, nb4 = ne + [1] * (4 - len(ne)), [es] + nb + [0] * (3 - len(nb))
        for i in range(1, 4):  # strides of unit dims are never stepped, but keep them monotone like ggml does
            if nb4[i] == 0:
                nb4[i] = nb4[i - 1] * ne4[i - 1]
        p = out.ptr
        for i in range(4):
            p.ne[i] = ne4[i]
            p.nb[i] = nb4[i]
        return out

    def permute(self, a: Tensor, a0: int, a1: int, a2: int, a3: int) -> Tensor:
        """ggml_permute: source dim i goes to position a_i."""
        _t(a)
        axes = tuple(_int(x, "axis", "permute") for x in (a0, a1, a2, a3))
        _require(sorted(axes) == [0, 1, 2, 3], lambda: f"permute: {axes} is not a permutation of 0..3")
        _require(not is_quantized(a.type) or axes[0] == 0,
                 lambda: f"permute: {a!r} is quantized: its blocks must stay along ne[0]")
        return self._wrap(lib.ggml_permute, a, *axes)

    def transpose(self, a: Tensor) -> Tensor:
        _t(a)
        _require(not is_quantized(a.type), lambda: f"transpose: {a!r} is quantized: its blocks must stay along ne[0]")
        return self._wrap(lib.ggml_transpose, a)

    def cont(self, a: Tensor, *ne: int) -> Tensor:
        _t(a)
        _copyable(a, a.type, "cont")
        if not ne:
            return self._wrap(lib.ggml_cont, a)
        ne = _dims(ne[0] if len(ne) == 1 and isinstance(ne[0], (tuple, list)) else ne, "cont")
        _require(math.prod(ne) == a.nelements, lambda: f"cont: {a!r} has {a.nelements} elements, ne={tuple(ne)} has "
                                                       f"{math.prod(ne)}")
        _whole_blocks(a.type, ne[0], "cont")
        fn = [None, lib.ggml_cont_1d, lib.ggml_cont_2d, lib.ggml_cont_3d, lib.ggml_cont_4d][len(ne)]
        return self._wrap(fn, a, *ne)

    def cpy(self, a: Tensor, b: Tensor) -> Tensor:
        """Copy (converting) ``a`` into ``b``; returns the view of ``b`` to depend on."""
        _t(a), _t(b)
        _require(a.nelements == b.nelements, lambda: f"cpy: {a!r} and {b!r} differ in element count")
        _copyable(a, b.type, "cpy", b)
        return self._wrap(lib.ggml_cpy, a, b)

    def cast(self, a: Tensor, type) -> Tensor:
        _t(a)
        t = as_type(type)
        _copyable(a, t, "cast")
        _whole_blocks(t, a.ne[0], "cast")
        return self._wrap(lib.ggml_cast, a, int(t))

    def repeat(self, a: Tensor, b: Tensor) -> Tensor:
        _t(a), _t(b)
        _require(_can_repeat(a, b), lambda: f"repeat: {a!r} does not tile {b!r}")
        _need_float(a, "repeat", _REPEAT_TYPES)
        _require(_elems_contiguous(a), lambda: f"repeat: elements of {a!r} are not contiguous")
        return self._wrap(lib.ggml_repeat, a, b)

    def repeat_4d(self, a: Tensor, *ne: int) -> Tensor:
        """Tile ``a`` to shape ``ne`` (ggml order, 1 to 4 dims; each a multiple of a's), without a template tensor."""
        _t(a)
        ne = _dims(ne[0] if len(ne) == 1 and isinstance(ne[0], (tuple, list)) else ne, "repeat_4d")
        ne = ne + [1] * (4 - len(ne))
        _require(all(n % an == 0 for n, an in zip(ne, a.ne)), lambda: f"repeat_4d: {a!r} does not tile ne={tuple(ne)}")
        _need_float(a, "repeat_4d", _REPEAT_TYPES)
        _require(_elems_contiguous(a), lambda: f"repeat_4d: elements of {a!r} are not contiguous")
        return self._wrap(lib.ggml_repeat_4d, a, *ne)

    def concat(self, a: Tensor, b: Tensor, dim: int) -> Tensor:
        _t(a), _t(b)
        dim = _int(dim, "dim", "concat")
        _require(0 <= dim < 4, lambda: f"concat: dim must be 0..3, got {dim}")
        _require(a.type == b.type, lambda: f"concat: types differ ({a!r}, {b!r})")
        for d in range(4):
            _require(d == dim or a.ne[d] == b.ne[d], lambda: f"concat along {dim}: ne[{d}] differs ({a!r}, {b!r})")
        _require(not is_quantized(a.type) or (_rows_contiguous(a) and _rows_contiguous(b)),
                 lambda: f"concat: rows of the quantized {a!r} and {b!r} must be contiguous")
        _require(lib.ggml_type_size(int(a.type)) > 0, lambda: f"concat: unsupported type {a!r}")
        return self._wrap(lib.ggml_concat, a, b, dim)

    def pad(self, a: Tensor, p0: int = 0, p1: int = 0, p2: int = 0, p3: int = 0) -> Tensor:
        """Zero padding at the end of each dim."""
        return self.pad_ext(a, 0, p0, 0, p1, 0, p2, 0, p3)

    def pad_ext(self, a: Tensor, lp0=0, rp0=0, lp1=0, rp1=0, lp2=0, rp2=0, lp3=0, rp3=0) -> Tensor:
        """Zero padding before and after each dim."""
        _t(a)
        pads = [_int(p, "padding", "pad", 0) for p in (lp0, rp0, lp1, rp1, lp2, rp2, lp3, rp3)]
        _require(max(pads) < 2 ** 31, "pad: padding out of range")  # int32 op parameters
        _need_float(a, "pad")
        _dims([n + pads[2 * i] + pads[2 * i + 1] for i, n in enumerate(a.ne)], "pad")
        if not any(pads[0::2]):
            return self._wrap(lib.ggml_pad, a, *pads[1::2])
        return self._wrap(lib.ggml_pad_ext, a, *pads)

    def pad_reflect_1d(self, a: Tensor, p0: int, p1: int) -> Tensor:
        _t(a)
        p0, p1 = _int(p0, "p0", "pad_reflect_1d", 0), _int(p1, "p1", "pad_reflect_1d", 0)
        _require(p0 < a.ne[0] and p1 < a.ne[0], lambda: f"pad_reflect_1d: padding ({p0}, {p1}) must be shorter than "
                                                        f"ne[0]={a.ne[0]}")
        _require(_packed(a), lambda: f"pad_reflect_1d: {a!r} is not contiguous")
        _need_float(a, "pad_reflect_1d")
        return self._wrap(lib.ggml_pad_reflect_1d, a, p0, p1)

    # -- elementwise -------------------------------------------------------------------------------------------
    def _binary(self, fn, name: str, a: Tensor, b: Tensor) -> Tensor:
        _t(a), _t(b)
        _require(_can_repeat(b, a), lambda: f"{name}: {b!r} does not broadcast to {a!r}")
        _require((a.type, b.type) in _BINARY_TYPES,
                 lambda: f"{name}: cannot combine {type_name(a.type)} with {type_name(b.type)} ({a!r}, {b!r}): "
                         "give both operands one float type, or an F32 second operand (ctx.cast first)")
        _require(_elems_contiguous(a), lambda: f"{name}: elements of {a!r} are not contiguous (ctx.cont first)")
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
        return self.scale_bias(a, s, 0.0)

    def scale_bias(self, a: Tensor, s: float, b: float) -> Tensor:
        """s * a + b."""
        _t(a)
        s, b = _finite(s, "the scale", "scale"), _finite(b, "the bias", "scale")
        _need_float(a, "scale")
        _require(_packed(a) and _padded_1d(a), lambda: f"scale: {a!r} is not contiguous (ctx.cont first)")
        if b == 0.0:
            return self._wrap(lib.ggml_scale, a, s)
        return self._wrap(lib.ggml_scale_bias, a, s, b)

    def clamp(self, a: Tensor, lo: float, hi: float) -> Tensor:
        """min(max(a, lo), hi), into a new tensor. (ggml_clamp works in place, writing through a view of ``a``:
        into a weight, or under another reader of ``a``, and through a layout its kernel does not follow. Here it
        clamps a contiguous copy.)"""
        _t(a)
        lo, hi = _number(lo, "lo", "clamp"), _number(hi, "hi", "clamp")
        _need_float(a, "clamp", (Type.F32, Type.F16))
        return self._wrap(lib.ggml_clamp, self._wrap(lib.ggml_cont, a), lo, hi)

    def _unary(self, fn, name: str, a: Tensor, *args, types=_FLOAT_TYPES) -> Tensor:
        _t(a)
        _need_float(a, name, types)
        _require(_elems_contiguous(a), lambda: f"{name}: elements of {a!r} are not contiguous (ctx.cont first)")
        return self._wrap(fn, a, *args)

    def gelu(self, a: Tensor) -> Tensor:
        """tanh-approximated GELU (GPT-2's 'gelu_new')."""
        return self._unary(lib.ggml_gelu, "gelu", a, types=(Type.F32, Type.F16))

    def gelu_erf(self, a: Tensor) -> Tensor:
        """exact GELU, 0.5 x (1 + erf(x / sqrt 2)) (torch's default)."""
        return self._unary(lib.ggml_gelu_erf, "gelu_erf", a, types=(Type.F32, Type.F16))

    def silu(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_silu, "silu", a, types=(Type.F32, Type.F16))

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
        slope = _finite(negative_slope, "negative_slope", "leaky_relu")
        _need_float(a, "leaky_relu", (Type.F32, Type.F16))
        # the kernel steps over all rows by nb[1]: dims 2 and 3 must be packed
        _require(_elems_contiguous(a) and _rows_contiguous(a),
                 lambda: f"leaky_relu: {a!r} is not contiguous (ctx.cont first)")
        return self._wrap(lib.ggml_leaky_relu, a, slope, False)

    def sqr(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_sqr, "sqr", a)

    def sqrt(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_sqrt, "sqrt", a)

    def log(self, a: Tensor) -> Tensor:
        return self._unary(lib.ggml_log, "log", a)

    def sum_rows(self, a: Tensor) -> Tensor:
        _t(a)
        _need_float(a, "sum_rows")
        _require(_elems_contiguous(a), lambda: f"sum_rows: elements of {a!r} are not contiguous")
        return self._wrap(lib.ggml_sum_rows, a)

    def mean(self, a: Tensor) -> Tensor:
        """Mean over ne[0]."""
        _t(a)
        _need_float(a, "mean")
        _require(_elems_contiguous(a), lambda: f"mean: elements of {a!r} are not contiguous")
        return self._wrap(lib.ggml_mean, a)

    def argmax(self, a: Tensor) -> Tensor:
        _t(a)
        _need_float(a, "argmax")
        _require(a.ne[2] == 1 and a.ne[3] == 1, lambda: f"argmax: needs a matrix, got {a!r}")
        _require(_elems_contiguous(a), lambda: f"argmax: elements of {a!r} are not contiguous")
        _require(a.ne[0] < 2 ** 31, lambda: f"argmax: rows of {a!r} are longer than int32 indices reach")
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
        try:
            ne = _dims(ne, "custom")
        except ShapeError as e:
            raise ShapeError(f"custom: bad shape {tuple(ne)}: {e}") from None
        ne = ne + [1] * (4 - len(ne))
        t = as_type(type)
        _whole_blocks(t, ne[0], "custom")
        nbytes = lib.ggml_type_size(int(t)) * (ne[0] // lib.ggml_blck_size(int(t))) * math.prod(ne[1:])
        _require(nbytes < MAX_BYTES, lambda: f"custom: ne={tuple(ne)} is too large")
        fn = ffi.cast("ggml_custom_op_t", fun)
        _require(fn != ffi.NULL, "custom: the C function is NULL")
        srcs = ffi.new("struct ggml_tensor *[]", [a.ptr for a in args] or [ffi.NULL])
        ud = ffi.NULL if userdata is None else ffi.cast("void *", userdata)
        tasks = -1 if n_tasks is None else int(n_tasks)  # -1: GGML_N_TASKS_MAX, every thread
        self._room(nbytes)
        self._track(*args)
        return Tensor(lib.ggml_custom_4d(self._live(), int(t), *ne, srcs, len(args), fn, tasks, ud), self)

    def custom2_inplace(self, fun, a: Tensor, b: Tensor, userdata=None, n_tasks: int | None = None) -> Tensor:
        """ggml_map_custom2_inplace: ``a`` overwritten by the C function ``fun`` (a ``ggml_custom2_op_t``: ``void
        fun(struct ggml_tensor * dst, const struct ggml_tensor * a, const struct ggml_tensor * b, int ith, int nth,
        void * userdata)``, dst a view of a) once per thread, reading ``b``; returns that view. For an op that
        writes each element only after reading it, so the graph needs no second buffer of a's size. ``userdata``
        must outlive every compute of the graph. Other backends cannot compute custom ops."""
        _t(a, "a"), _t(b, "b")
        _require(a.is_contiguous, lambda: f"custom2_inplace: {a!r} must be contiguous")
        fn = ffi.cast("ggml_custom2_op_t", fun)
        _require(fn != ffi.NULL, "custom2_inplace: the C function is NULL")
        ud = ffi.NULL if userdata is None else ffi.cast("void *", userdata)
        tasks = -1 if n_tasks is None else int(n_tasks)
        self._room(0)
        self._track(a, b)
        return Tensor(lib.ggml_map_custom2_inplace(self._live(), a.ptr, b.ptr, fn, tasks, ud), self)

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
        traits = lib.ggml_get_type_traits_cpu(int(a.type))
        _require(traits.vec_dot != ffi.NULL, lambda: f"mul_mat: the CPU has no {type_name(a.type)} dot product "
                                                     f"({a!r})")
        _require(b.type == Type.F32 or (b.type in (Type.F16, Type.BF16) and b.type == traits.vec_dot_type),
                 lambda: f"mul_mat: b must be F32 (or {type_name(a.type)} like a), got {b!r}")
        _require(_elems_contiguous(a) and _elems_contiguous(b),
                 lambda: f"mul_mat: elements of {a!r} and {b!r} must be contiguous (ctx.cont first)")
        out = self._wrap(lib.ggml_mul_mat, a, b)
        if precise:
            lib.ggml_mul_mat_set_prec(out.ptr, lib.GGML_PREC_F32)
        return out

    # -- normalisation -----------------------------------------------------------------------------------------
    def _norm(self, fn, name: str, a: Tensor, eps) -> Tensor:
        _t(a)
        eps = _finite(eps, "eps", name, minimum=0.0)
        _need_float(a, name)
        _require(a.nb[0] == 4, lambda: f"{name}: elements of {a!r} are not contiguous")
        return self._wrap(fn, a, eps)

    def norm(self, a: Tensor, eps: float) -> Tensor:
        """(a - mean) / sqrt(var + eps) over ne[0] (LayerNorm without affine)."""
        return self._norm(lib.ggml_norm, "norm", a, eps)

    def rms_norm(self, a: Tensor, eps: float) -> Tensor:
        return self._norm(lib.ggml_rms_norm, "rms_norm", a, eps)

    def l2_norm(self, a: Tensor, eps: float) -> Tensor:
        """a / max(||a||, eps) over ne[0]."""
        return self._norm(lib.ggml_l2_norm, "l2_norm", a, eps)

    def group_norm(self, a: Tensor, n_groups: int, eps: float) -> Tensor:
        """GroupNorm without affine; groups split ne[2] (channels), statistics over ne[0], ne[1] and the group.

        For (channels, time) data of numpy shape (B, C, T) use a tensor of ne (T, 1, C, B).
        """
        _t(a)
        n_groups = _int(n_groups, "n_groups", "group_norm", 1)
        eps = _finite(eps, "eps", "group_norm", minimum=0.0)
        _need_float(a, "group_norm")
        _require(_packed(a), lambda: f"group_norm: {a!r} is not contiguous")
        _require(a.ne[2] % n_groups == 0, lambda: f"group_norm: {n_groups} groups do not split ne[2]={a.ne[2]}")
        return self._wrap(lib.ggml_group_norm, a, n_groups, eps)

    # -- attention ---------------------------------------------------------------------------------------------
    def soft_max(self, a: Tensor) -> Tensor:
        _t(a)
        _need_float(a, "soft_max")
        _require(_packed(a), lambda: f"soft_max: {a!r} is not contiguous")
        return self._wrap(lib.ggml_soft_max, a)

    def soft_max_ext(self, a: Tensor, mask: Tensor | None, scale: float, max_bias: float = 0.0) -> Tensor:
        """softmax(a * scale + mask) over ne[0]; mask (F16/F32) broadcasts over ne[2], ne[3]."""
        _t(a)
        scale = _finite(scale, "scale", "soft_max_ext")
        max_bias = _finite(max_bias, "max_bias", "soft_max_ext", minimum=0.0)
        _need_float(a, "soft_max_ext")
        _require(_packed(a), lambda: f"soft_max_ext: {a!r} is not contiguous")
        if mask is not None:
            _t(mask, "mask")
            _require(mask.type in (Type.F16, Type.F32), lambda: f"soft_max_ext: mask must be F16/F32, got {mask!r}")
            _require(_packed(mask), lambda: f"soft_max_ext: mask {mask!r} is not contiguous")
            _require(mask.ne[0] == a.ne[0] and mask.ne[1] >= a.ne[1],
                     lambda: f"soft_max_ext: mask {mask!r} does not cover {a!r}")
            _require(a.ne[2] % mask.ne[2] == 0 and a.ne[3] % mask.ne[3] == 0,
                     lambda: f"soft_max_ext: mask {mask!r} does not broadcast over {a!r}")
        _require(max_bias == 0 or mask is not None, "soft_max_ext: max_bias (ALiBi) needs a mask")
        return self._wrap(lib.ggml_soft_max_ext, a, mask if mask is not None else ffi.NULL, scale, max_bias)

    def diag_mask_inf(self, a: Tensor, n_past: int) -> Tensor:
        _t(a)
        n_past = _int(n_past, "n_past", "diag_mask_inf", 0)
        _need_float(a, "diag_mask_inf")
        _require(_packed(a), lambda: f"diag_mask_inf: {a!r} is not contiguous")
        return self._wrap(lib.ggml_diag_mask_inf, a, n_past)

    def flash_attn_ext(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                       max_bias: float = 0.0, logit_softcap: float = 0.0, precise: bool = True) -> Tensor:
        """Fused softmax(scale * q k^T + mask) v.

        q: ne (D, n_q, H, B); k, v: ne (D, n_kv, H_kv, B) with H % H_kv == 0; mask: F16 ne (n_kv, >= n_q, 1|H, 1|B).
        Result ne is (D_v, H, n_q, B): heads and queries swapped, ready to be reshaped to (D_v*H, n_q, B).
        """
        _t(q, "q"), _t(k, "k"), _t(v, "v")
        scale = _finite(scale, "scale", "flash_attn_ext")
        max_bias = _finite(max_bias, "max_bias", "flash_attn_ext", minimum=0.0)
        logit_softcap = _finite(logit_softcap, "logit_softcap", "flash_attn_ext", minimum=0.0)
        _require(k.ne[0] == q.ne[0], lambda: f"flash_attn_ext: head size of q {q!r} and k {k!r} differ")
        _require(q.ne[2] % k.ne[2] == 0, lambda: f"flash_attn_ext: {q.ne[2]} query heads are not a multiple of "
                                                 f"{k.ne[2]} kv heads")
        _require(q.ne[3] == k.ne[3] == v.ne[3], "flash_attn_ext: batch (ne[3]) of q, k, v differ")
        _require(k.ne[1] == v.ne[1] and k.ne[2] == v.ne[2], lambda: f"flash_attn_ext: k {k!r} and v {v!r} do not match")
        _require(q.type == Type.F32, lambda: f"flash_attn_ext: q must be F32, got {q!r}")
        _require(k.type == v.type and k.type in (Type.F32, Type.F16),
                 lambda: f"flash_attn_ext: k and v must both be F16 or both F32, got {k!r}, {v!r}")
        for t, what in ((q, "q"), (k, "k"), (v, "v")):
            _require(_elems_contiguous(t), lambda: f"flash_attn_ext: elements of {what} {t!r} are not contiguous")
        if mask is not None:
            _t(mask, "mask")
            _require(mask.type == Type.F16, lambda: f"flash_attn_ext: mask must be F16, got {mask!r}")
            _require(_packed(mask), "flash_attn_ext: mask is not contiguous")
            _require(mask.ne[0] == k.ne[1] and mask.ne[1] >= q.ne[1],
                     lambda: f"flash_attn_ext: mask {mask!r} must be (n_kv={k.ne[1]}, >= n_q={q.ne[1]})")
            _require(q.ne[2] % mask.ne[2] == 0 and q.ne[3] % mask.ne[3] == 0,
                     lambda: f"flash_attn_ext: mask {mask!r} does not broadcast over the heads/batch of {q!r}")
        _require(max_bias == 0 or mask is not None, "flash_attn_ext: max_bias (ALiBi) needs a mask")
        out = self._wrap(lib.ggml_flash_attn_ext, q, k, v, mask if mask is not None else ffi.NULL,
                         scale, max_bias, logit_softcap)
        if precise:
            lib.ggml_flash_attn_ext_set_prec(out.ptr, lib.GGML_PREC_F32)
        return out

    # -- convolution -------------------------------------------------------------------------------------------
    def im2col(self, kernel: Tensor, x: Tensor, s0: int, s1: int, p0: int, p1: int, d0: int, d1: int,
               is_2d: bool, dst_type=Type.F32) -> Tensor:
        """Unfold ``x`` for a convolution with ``kernel``'s shape. 1-D: kernel ne (K, C_in, C_out), x ne (L, C_in, B)
        -> ne (K*C_in, L_out, B); then mul_mat(kernel reshaped to (K*C_in, C_out), cols) is the convolution.
        Only the kernel's shape is read, never its data."""
        _t(kernel, "kernel"), _t(x, "x")
        s0, d0, p0 = (_int(v, n, "im2col", lo) for v, n, lo in ((s0, "s0", 1), (d0, "d0", 1), (p0, "p0", 0)))
        dst = as_type(dst_type)
        _require(dst in (Type.F32, Type.F16), "im2col: dst_type must be F32 or F16")
        _need_float(x, "im2col", (Type.F32, Type.F16) if dst == Type.F16 else (Type.F32,))
        _require(_elems_contiguous(x), lambda: f"im2col: elements of {x!r} are not contiguous")
        if is_2d:
            s1, d1, p1 = (_int(v, n, "im2col", lo) for v, n, lo in ((s1, "s1", 1), (d1, "d1", 1), (p1, "p1", 0)))
            _require(kernel.ne[2] == x.ne[2], lambda: f"im2col: channels of kernel {kernel!r} and input {x!r} differ")
            oh = (x.ne[1] + 2 * p1 - d1 * (kernel.ne[1] - 1) - 1) // s1 + 1
            _require(oh > 0, lambda: f"im2col: input {x!r} is too small for kernel {kernel!r}")
        else:
            s1, p1, d1 = 0, 0, 0
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
        s0 = _int(s0, "stride", "conv_transpose_1d", 1)
        _require(x.ne[2] == 1 and x.ne[3] == 1, lambda: f"conv_transpose_1d: input must be 2-D (L, C_in), got {x!r}")
        _require(kernel.ne[2] == x.ne[1] and kernel.ne[3] == 1,
                 lambda: f"conv_transpose_1d: kernel {kernel!r} expects {kernel.ne[2]} input channels, input {x!r}")
        _need_float(kernel, "conv_transpose_1d", (Type.F32, Type.F16))
        _need_float(x, "conv_transpose_1d")
        _require(_elems_contiguous(kernel) and _elems_contiguous(x),
                 lambda: f"conv_transpose_1d: elements of kernel {kernel!r} and input {x!r} must be contiguous")
        _dims([(x.ne[0] - 1) * s0 + kernel.ne[0], kernel.ne[1]], "conv_transpose_1d")
        return self._wrap(lib.ggml_conv_transpose_1d, kernel, x, s0, 0, 1)

    def interpolate(self, a: Tensor, ne: Sequence[int], mode: str = "nearest") -> Tensor:
        """Resize to ``ne`` (ggml order); nearest/bilinear/bicubic over ne[0], ne[1] (and nearest over 2, 3)."""
        _t(a)
        _need_float(a, "interpolate")
        modes = {"nearest": lib.GGML_SCALE_MODE_NEAREST, "bilinear": lib.GGML_SCALE_MODE_BILINEAR,
                 "bicubic": lib.GGML_SCALE_MODE_BICUBIC}
        if mode not in modes:
            raise ValueError(f"interpolate: mode must be one of {sorted(modes)}, got {mode!r}")
        ne = _dims(ne, "interpolate")
        ne = ne + [1] * (4 - len(ne))
        return self._wrap(lib.ggml_interpolate, a, *ne, modes[mode])

    # -- embeddings and rows -----------------------------------------------------------------------------------
    def get_rows(self, a: Tensor, ids: Tensor) -> Tensor:
        """Rows ``ids`` (I32, ne (n, B1, B2)) of ``a`` (ne (D, rows, B1, B2)) -> ne (D, n, B1, B2), as F32.

        The ids are graph data: ``Backend.compute`` checks the ids it is given as inputs against ``a``'s rows
        (ggml aborts on an id out of range); ids computed inside a graph are not checked."""
        _t(a), _t(ids, "ids")
        _require(ids.type == Type.I32, lambda: f"get_rows: ids must be I32, got {ids!r}")
        _require(a.ne[2] == ids.ne[1] and a.ne[3] == ids.ne[2] and ids.ne[3] == 1,
                 lambda: f"get_rows: ids {ids!r} do not match the batch dims of {a!r}")
        _require(a.type in (Type.F32, Type.F16, Type.BF16, Type.I32) or
                 (is_quantized(a.type) and lib.ggml_get_type_traits(int(a.type)).to_float != ffi.NULL),
                 lambda: f"get_rows: the CPU cannot read rows of {a!r}")
        _require(_elems_contiguous(a), lambda: f"get_rows: elements of {a!r} are not contiguous")
        return self._wrap(lib.ggml_get_rows, a, ids)

    def set_rows(self, a: Tensor, b: Tensor, ids: Tensor) -> Tensor:
        """Write rows of ``b`` into ``a`` at ``ids`` (in place; returns the view to depend on). Input ids are
        checked against ``a``'s rows at compute, as get_rows's."""
        _t(a), _t(b), _t(ids, "ids")
        _require(a.ne[0] == b.ne[0] and a.ne[2] == b.ne[2] and a.ne[3] == b.ne[3],
                 lambda: f"set_rows: rows of {b!r} do not fit {a!r}")
        _require(b.ne[1] == ids.ne[0] and b.ne[2] % ids.ne[1] == 0 and b.ne[3] % ids.ne[2] == 0 and ids.ne[3] == 1,
                 lambda: f"set_rows: ids {ids!r} do not match {b!r}")
        _require(b.type in (Type.F32, Type.F16), lambda: f"set_rows: source must be F32/F16, got {b!r}")
        _require(ids.type in (Type.I32, Type.I64), lambda: f"set_rows: ids must be I32/I64, got {ids!r}")
        _require(lib.ggml_get_type_traits_cpu(int(a.type)).from_float != ffi.NULL and a.type not in _NOT_STORABLE,
                 lambda: f"set_rows: the CPU cannot write {type_name(a.type)} rows ({a!r})")
        _whole_blocks(a.type, a.ne[0], "set_rows")
        _require(bool(lib.ggml_is_contiguous_rows(a.ptr)) and bool(lib.ggml_is_contiguous_rows(b.ptr)),
                 "set_rows: rows must be contiguous")
        return self._wrap(lib.ggml_set_rows, a, b, ids)

    def timestep_embedding(self, timesteps: Tensor, dim: int, max_period: int = 10000) -> Tensor:
        """[cos | sin] sinusoidal embedding of 1-D F32 timesteps -> ne (dim, n)."""
        _t(timesteps)
        dim = _int(dim, "dim", "timestep_embedding", 1)
        max_period = _int(max_period, "max_period", "timestep_embedding", 1)
        _need_float(timesteps, "timestep_embedding")
        _require(timesteps.n_dims == 1, lambda: f"timestep_embedding: timesteps must be 1-D, got {timesteps!r}")
        _require(_elems_contiguous(timesteps), "timestep_embedding: timesteps are not contiguous")
        _require(max_period < 2 ** 31, "timestep_embedding: max_period out of range")
        _dims([dim + 1, timesteps.ne[0]], "timestep_embedding")
        return self._wrap(lib.ggml_timestep_embedding, timesteps, dim, max_period)

    # -- rotary embeddings and gated units ----------------------------------------------------------------------
    def rope_neox(self, a: Tensor, positions: Tensor, n_dims: int, freq_base: float = 10000.0) -> Tensor:
        """Rotary position embedding in the rotate-half ("NeoX") form on the first ``n_dims`` of each row:
        with h = n_dims/2 and theta_i = pos * freq_base^(-2i/n_dims), element i becomes x_i cos - x_(i+h) sin and
        element i+h becomes x_i sin + x_(i+h) cos; elements n_dims.. are copied.

        a: F32 ne (D, H, T, B) (rows contiguous, any other strides); positions: I32 ne (T).
        """
        _t(a), _t(positions, "positions")
        n_dims = _int(n_dims, "n_dims", "rope_neox", 1)
        freq_base = _finite(freq_base, "freq_base", "rope_neox", positive=True)
        _need_float(a, "rope_neox")
        _require(a.nb[0] == 4, lambda: f"rope_neox: elements of {a!r} are not contiguous")
        _require(positions.type == Type.I32 and positions.n_dims == 1,
                 lambda: f"rope_neox: positions must be a 1-D I32 tensor, got {positions!r}")
        _require(positions.ne[0] == a.ne[2], lambda: f"rope_neox: {positions.ne[0]} positions for ne[2]={a.ne[2]} of "
                                                     f"{a!r}")
        _require(n_dims <= a.ne[0] and n_dims % 2 == 0,
                 lambda: f"rope_neox: n_dims={n_dims} must be even and within ne[0]={a.ne[0]}")
        # ext_factor 0, attn_factor 1, freq_scale 1: plain RoPE (the YaRN parameters then have no effect)
        return self._wrap(lib.ggml_rope_ext, a, positions, ffi.NULL, n_dims, lib.GGML_ROPE_TYPE_NEOX, 0,
                          freq_base, 1.0, 0.0, 1.0, 0.0, 0.0)

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


__all__ = ["Context", "NUMPY_DTYPES", "MAX_BYTES"]
