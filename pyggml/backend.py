"""Backends (CPU with a thread count, CUDA when built), their buffers, and graph compute.

    be = Backend("cpu", threads=4)          # or Backend("cuda", device=0)
    weights = be.alloc_tensors(ctx)         # memory for every tensor of a no_alloc context
    out = be.compute(graph)                 # intermediate tensors get memory from a reusable graph allocator
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import numpy as np

from .context import Context
from .errors import BackendUnavailable, ClosedError, GGMLError, InputError, OutOfMemory
from .graph import Graph
from .raw import HAS_CUDA, ffi, lib, string
from .tensor import Tensor, _owner


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cuda_device_count() -> int:
    """Number of CUDA devices (0 when pyggml was built without CUDA)."""
    return int(lib.ggml_backend_cuda_get_device_count()) if HAS_CUDA else 0


def cuda_available() -> bool:
    return cuda_device_count() > 0


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    kind: str
    memory_free: int
    memory_total: int


_DEV_KINDS = {lib.GGML_BACKEND_DEVICE_TYPE_CPU: "cpu", lib.GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
              lib.GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel"}


def devices() -> list[Device]:
    """Every device ggml's backend registry knows (CPU, and each CUDA GPU when built with CUDA)."""
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ffi.new("size_t *"), ffi.new("size_t *")
        lib.ggml_backend_dev_memory(dev, free, total)
        out.append(Device(string(lib.ggml_backend_dev_name(dev)), string(lib.ggml_backend_dev_description(dev)),
                          _DEV_KINDS.get(lib.ggml_backend_dev_type(dev), "other"), int(free[0]), int(total[0])))
    return out


def backend_names() -> list[str]:
    """Backends this build can create ('cpu', and 'cuda' when compiled in)."""
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


class BufferType:
    """A kind of backend memory. Besides each backend's default, the CPU backend offers "extra" types that store
    matmul weights in the layout of a faster kernel (AMX on Intel CPUs that have it, CPU_REPACK): such memory is
    not host memory, and only the ops those kernels implement may read it (``Backend.compute`` checks)."""

    def __init__(self, ptr):
        self.ptr = ptr

    @property
    def name(self) -> str:
        return string(lib.ggml_backend_buft_name(self.ptr))

    @property
    def is_host(self) -> bool:
        return bool(lib.ggml_backend_buft_is_host(self.ptr))

    def __repr__(self) -> str:
        return f"<BufferType {self.name}>"


class Buffer:
    """Backend memory holding the tensors of one context (weights, KV caches, inputs).

    Keep it referenced as long as its tensors are used: freeing it (``free()``, or dropping the last reference)
    detaches them, and any later read, write or compute that needs them raises ClosedError."""

    def __init__(self, ptr, backend: "Backend", ctx: Context | None):
        self.ptr = ptr
        self.backend = backend
        self.ctx = ctx  # the tensors described there live in this buffer: keep both alive together

    def _live(self):
        if self.ptr == ffi.NULL:
            raise ClosedError("this Buffer was freed")
        return self.ptr

    @property
    def size(self) -> int:
        return int(lib.ggml_backend_buffer_get_size(self.ptr)) if self.ptr != ffi.NULL else 0

    @property
    def name(self) -> str:
        return string(lib.ggml_backend_buffer_name(self._live()))

    @property
    def is_host(self) -> bool:
        return bool(lib.ggml_backend_buffer_is_host(self._live()))

    def clear(self, value: int = 0) -> None:
        lib.ggml_backend_buffer_clear(self._live(), int(value) & 0xFF)

    def set_usage_weights(self) -> None:
        """Tell the scheduler-aware backends this buffer holds weights (lets CUDA keep it on the device)."""
        lib.ggml_backend_buffer_set_usage(self._live(), lib.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)

    def free(self, reason: str | None = None) -> None:
        """Free the memory; the context's tensors that lived in it are detached (ClosedError on use, naming
        ``reason``)."""
        ptr = getattr(self, "ptr", ffi.NULL)
        if ptr == ffi.NULL:
            return
        ctx = getattr(self, "ctx", None)
        if ctx is not None and ctx._open:
            p = lib.ggml_get_first_tensor(ctx.ptr)
            while p != ffi.NULL:
                if p.buffer == ptr:
                    p.data = ffi.NULL
                    p.buffer = ffi.NULL
                p = lib.ggml_get_next_tensor(ctx.ptr, p)
            ctx._released = reason or "their backend buffer was freed"
        lib.ggml_backend_buffer_free(ptr)
        self.ptr = ffi.NULL

    def __del__(self):
        try:
            self.free("their backend buffer was freed when the Buffer object was dropped (keep the Buffer that "
                      "Backend.alloc_tensors returns referenced while its tensors are used)")
        except Exception:  # interpreter shutdown
            pass


def _forget_compute_memory(graph: Graph | None, ctx: Context | None = None, g=None) -> None:
    """Detach what a graph allocator placed: every node (results and views alike: a view of a persistent tensor is
    simply re-initialised from its source) and the input leafs. Their old buffer may be freed already, so it is
    never looked at; neither is a tensor of a context closed since. Takes the Graph, or its context and graph
    pointer (the Graph object may be gone while its context, and so its tensors, live on)."""
    if graph is not None:
        ctx, g = graph.ctx, graph._ptr
    if ctx is None or not ctx._open:
        return
    nodes = [lib.ggml_graph_node(g, i) for i in range(lib.ggml_graph_n_nodes(g))]
    keys = {int(ffi.cast("uintptr_t", p)) for p in nodes}
    input_flag = lib.GGML_TENSOR_FLAG_INPUT
    for p in nodes:
        p.data = ffi.NULL
        p.buffer = ffi.NULL
    for p in nodes:
        for s in p.src:
            if s != ffi.NULL and int(ffi.cast("uintptr_t", s)) not in keys and _owner(s, ctx)._open \
                    and s.flags & input_flag:
                s.data = ffi.NULL
                s.buffer = ffi.NULL


class _GraphInputs:
    """What Backend.compute checks of a graph's inputs on every call, found once per graph: the input leafs it
    must be given (all but those read for their shape alone), and the input ids that index tables."""

    # (op, source index) pairs whose source ggml reads for its shape only, never its data
    SHAPE_ONLY = {(lib.GGML_OP_IM2COL, 0)}

    def __init__(self, graph: Graph):
        g = graph._ptr
        nodes = [lib.ggml_graph_node(g, i) for i in range(lib.ggml_graph_n_nodes(g))]
        node_keys = {_key(p) for p in nodes}
        input_flag = lib.GGML_TENSOR_FLAG_INPUT
        self.required: dict[int, object] = {}    # key -> tensor pointer (for messages)
        self.optional: set[int] = set()          # inputs read for their shape only
        read, shape_only = set(), set()
        for p in nodes:
            for i, s in enumerate(p.src):
                if s == ffi.NULL or _key(s) in node_keys:
                    continue
                k = _key(s)
                if (p.op, i) in self.SHAPE_ONLY:
                    shape_only.add(k)
                else:
                    read.add(k)
                    if s.flags & input_flag:
                        self.required[k] = s
                if (p.op, i) in self.SHAPE_ONLY and s.flags & input_flag:
                    self.optional.add(k)
        self.optional -= set(self.required)
        self.shape_only = shape_only - read      # leafs whose data is never read: they need no memory
        # ids given as inputs: (input key, number of rows they index, op name), once per input with the fewest rows
        # any op indexes by it (a decode step's 60 set_rows all write at the same slots: one check, not 60)
        tightest: dict[int, tuple[int, str]] = {}
        for p in nodes:
            if p.op == lib.GGML_OP_GET_ROWS:
                ids, rows, name = p.src[1], int(p.src[0].ne[1]), "get_rows"
            elif p.op == lib.GGML_OP_SET_ROWS:
                ids, rows, name = p.src[1], int(p.ne[1]), "set_rows"
            else:
                continue
            base = _input_base(ids, input_flag)
            if base is not None and (_key(base) not in tightest or rows < tightest[_key(base)][0]):
                tightest[_key(base)] = (rows, name)
        self.ids: list[tuple[int, int, str]] = [(k, rows, name) for k, (rows, name) in tightest.items()]


def _key(p) -> int:
    return int(ffi.cast("uintptr_t", p))


def _input_base(p, input_flag):
    """The input tensor ``p`` is, or views whole (reshape/view of all its elements); None otherwise."""
    n = lib.ggml_nelements(p)
    while p.op in (lib.GGML_OP_VIEW, lib.GGML_OP_RESHAPE, lib.GGML_OP_PERMUTE, lib.GGML_OP_TRANSPOSE) \
            and p.view_src != ffi.NULL:
        p = p.view_src
    if p.op == lib.GGML_OP_NONE and p.flags & input_flag and lib.ggml_nelements(p) == n and p.view_src == ffi.NULL:
        return p
    return None


class GraphAllocator:
    """Memory for a graph's intermediate tensors, reused (and grown when needed) across graphs."""

    def __init__(self, backend: "Backend"):
        self.backend = backend
        self.ptr = lib.ggml_gallocr_new(lib.ggml_backend_get_default_buffer_type(backend._live()))
        self._last = None
        self._placed = None   # (weakref to the context, graph pointer) of the graph whose tensors hold our memory
        if self.ptr == ffi.NULL:
            raise OutOfMemory("ggml_gallocr_new failed")

    def _live(self):
        if self.ptr == ffi.NULL:
            raise ClosedError("this GraphAllocator was freed (its Backend closed?)")
        return self.ptr

    def alloc(self, graph: Graph) -> None:
        # ggml_gallocr_alloc_graph reuses the previous plan whenever the tensor sizes still fit, without comparing
        # the graphs' structure: a plan made for another graph (its in-place reuse of an input, say) can then
        # overlap live tensors. Plan afresh for every new graph; recomputing the same graph keeps its plan.
        self._live()
        self.backend._live()
        last = self._last() if self._last is not None else None
        if last is not graph:
            self._forget_placed(graph)
            if getattr(graph, "_placed", False):
                # ggml-alloc skips tensors that already have data: a graph computed before (under another plan or
                # allocator, perhaps in a buffer since freed) would keep stale addresses. Forget them first.
                _forget_compute_memory(graph)
            if not lib.ggml_gallocr_reserve(self.ptr, graph.ptr):
                raise OutOfMemory(f"{self.backend.name}: could not reserve memory for a graph of "
                                  f"{graph.n_nodes} nodes")
            self._last = weakref.ref(graph)
        if not lib.ggml_gallocr_alloc_graph(self.ptr, graph.ptr):
            raise OutOfMemory(f"{self.backend.name}: could not allocate memory for a graph of {graph.n_nodes} nodes")
        graph._placed = True
        self._placed = (weakref.ref(graph.ctx), graph._ptr)

    def _forget_placed(self, keep: Graph | None = None) -> None:
        """The tensors of the graph placed last (by this allocator) lose their memory to the next one: detach them,
        so that reading such a stale result raises instead of returning the next graph's data."""
        if self._placed is None:
            return
        ref, g = self._placed
        self._placed = None
        ctx = ref()
        if ctx is not None and not (keep is not None and keep.ctx is ctx and keep._ptr == g):
            _forget_compute_memory(None, ctx, g)

    @property
    def size(self) -> int:
        return int(lib.ggml_gallocr_get_buffer_size(self.ptr, 0))

    def free(self) -> None:
        if getattr(self, "ptr", ffi.NULL) != ffi.NULL:
            self._forget_placed()   # its results lived in the memory freed now
            self._last = None
            lib.ggml_gallocr_free(self.ptr)
            self.ptr = ffi.NULL

    def __del__(self):
        try:
            self.free()
        except Exception:  # interpreter shutdown
            pass


class Backend:
    """A ggml backend: ``Backend("cpu", threads=N)`` or ``Backend("cuda", device=i)``."""

    def __init__(self, kind: str = "cpu", *, threads: int | None = None, device: int = 0):
        self.ptr, self._allocator = ffi.NULL, None
        kind = kind.lower()
        if kind.startswith("cuda:"):
            kind, device = "cuda", int(kind.split(":", 1)[1])
        self.kind = kind
        self.threads = None
        if kind == "cpu":
            self.ptr = lib.ggml_backend_cpu_init()
            if self.ptr == ffi.NULL:
                raise BackendUnavailable("ggml_backend_cpu_init failed")
            self.set_threads(threads if threads is not None else _default_threads())
        elif kind in ("cuda", "gpu"):
            self.kind = "cuda"
            if not HAS_CUDA:
                raise BackendUnavailable("pyggml was built without CUDA: reinstall with "
                                         "pip install . -C cmake.define.GGML_CUDA=ON")
            n = cuda_device_count()
            if not 0 <= device < n:
                raise BackendUnavailable(f"CUDA device {device} requested, {n} present")
            self.ptr = lib.ggml_backend_cuda_init(device)
            if self.ptr == ffi.NULL:
                raise BackendUnavailable(f"ggml_backend_cuda_init({device}) failed")
        else:
            raise ValueError(f"unknown backend {kind!r}: choose from {backend_names()}")
        self.device = device
        self._allocator: GraphAllocator | None = None

    def _live(self):
        if self.ptr == ffi.NULL:
            raise ClosedError(f"this {self.kind} Backend was closed")
        return self.ptr

    @property
    def closed(self) -> bool:
        return self.ptr == ffi.NULL

    @property
    def name(self) -> str:
        return string(lib.ggml_backend_name(self._live()))

    def set_threads(self, threads: int) -> None:
        if self.kind != "cpu":
            raise ValueError("only the CPU backend takes a thread count")
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
            raise TypeError(f"threads must be an integer, got {threads!r}")
        threads = int(threads)
        if not 1 <= threads <= 4096:
            raise ValueError(f"threads must be >= 1 (and at most 4096), got {threads}")
        lib.ggml_backend_cpu_set_n_threads(self._live(), threads)
        self.threads = threads

    def __repr__(self) -> str:
        extra = f", threads={self.threads}" if self.kind == "cpu" else f", device={self.device}"
        return f"Backend({self.kind!r}{extra})"

    # -- memory ------------------------------------------------------------------------------------------------
    def alloc_tensors(self, ctx: Context, buffer_type: BufferType | None = None) -> Buffer:
        """Allocate every tensor of a ``no_alloc`` context in one buffer of this backend (of ``buffer_type``, one
        of ``extra_buffer_types()``, when given). Write an extra type's tensors whole, with ``Tensor.set`` or
        ggml_backend_tensor_set: that is where they are converted to the kernel's layout."""
        if not isinstance(ctx, Context):
            raise TypeError(f"alloc_tensors takes a pyggml Context, not {type(ctx).__name__}")
        if not ctx.no_alloc:
            raise ValueError("alloc_tensors needs a Context created with no_alloc=True")
        self._live()
        tensors = ctx.tensors()
        if tensors and all(t.ptr.data != ffi.NULL or t.ptr.view_src != ffi.NULL or t.nelements == 0
                           for t in tensors):
            raise GGMLError("alloc_tensors: the context's tensors have memory already")
        if buffer_type is None:
            ptr = lib.ggml_backend_alloc_ctx_tensors(ctx._live(), self.ptr)
        else:
            if not lib.ggml_backend_supports_buft(self.ptr, buffer_type.ptr):
                raise ValueError(f"the {self.name} backend cannot use {buffer_type.name} memory")
            ptr = lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx._live(), buffer_type.ptr)
        if ptr == ffi.NULL:
            if not tensors:
                raise ValueError("alloc_tensors: the context has no tensors")
            raise OutOfMemory(f"{self.name}: could not allocate the context's tensors "
                              f"({sum(t.nbytes for t in tensors)} bytes)")
        ctx._released = None
        return Buffer(ptr, self, ctx)

    def extra_buffer_types(self) -> list[BufferType]:
        """The device's extra buffer types (CPU: AMX, CPU_REPACK when this CPU and build have them)."""
        dev = lib.ggml_backend_get_device(self._live())
        reg = lib.ggml_backend_dev_backend_reg(dev)
        fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if fn == ffi.NULL:
            return []
        arr = ffi.cast("ggml_backend_buffer_type_t * (*)(ggml_backend_dev_t)", fn)(dev)
        out = []
        while arr != ffi.NULL and arr[len(out)] != ffi.NULL:
            out.append(BufferType(arr[len(out)]))
        return out

    @property
    def allocator(self) -> GraphAllocator:
        self._live()
        if self._allocator is None:
            self._allocator = GraphAllocator(self)
        return self._allocator

    # -- compute -----------------------------------------------------------------------------------------------
    def supports(self, t: Tensor) -> bool:
        return bool(lib.ggml_backend_supports_op(self._live(), t.ptr))

    def _check_leafs(self, graph: Graph, shape_only=frozenset()) -> None:
        for leaf in graph.leafs():
            p = leaf.ptr
            if p.flags & lib.GGML_TENSOR_FLAG_INPUT or _key(p) in shape_only:
                continue  # the graph allocator places inputs (an input's old buffer may be freed: do not look)
            if p.data == ffi.NULL and p.view_src == ffi.NULL:
                # the graph allocator would give it scratch memory: a forgotten weight would read garbage
                raise GGMLError(f"graph input {leaf!r} has no memory: allocate its context with "
                                "Backend.alloc_tensors (or give it data) before compute")
            buf = p.buffer if p.view_src == ffi.NULL else p.view_src.buffer
            if buf != ffi.NULL and not lib.ggml_backend_supports_buft(self.ptr, lib.ggml_backend_buffer_get_type(buf)):
                raise GGMLError(f"{leaf!r} lives in a {string(lib.ggml_backend_buffer_name(buf))} buffer that the "
                                f"{self.name} backend cannot read")

    def compute(self, graph: Graph, inputs: dict | None = None, allocator: GraphAllocator | None = None,
                check: bool = True) -> Graph:
        """Allocate the graph's intermediate tensors, write ``inputs`` ({tensor: array}, tensors of the graph's
        context marked ``set_input()``), and compute; results are read with ``tensor.get()``.

        ``check=False`` skips the per-node checks (leaf memory, backend support): for hot loops that rebuild
        one already-checked graph shape, such as a decode step.
        """
        if not isinstance(graph, Graph):
            raise TypeError(f"compute takes a pyggml Graph, not {type(graph).__name__}")
        self._live()
        graph._check_contexts()      # ClosedError for a graph over freed tensors (a closed model file, say)
        inputs = inputs or {}
        info = graph.__dict__.get("_inputs_info")
        if info is None:
            info = graph._inputs_info = _GraphInputs(graph)
        given = {}
        for t in inputs:
            if not isinstance(t, Tensor):
                raise TypeError(f"compute: inputs are {{Tensor: array}}, got a key of type {type(t).__name__}")
            p = t.ptr
            if not p.flags & lib.GGML_TENSOR_FLAG_INPUT:
                raise GGMLError(f"{t!r} is not marked as a graph input (call .set_input() when creating it), so "
                                "the allocator may have reused its memory")
            k = _key(p)
            if k not in info.required and k not in info.optional:
                raise InputError(f"{t!r} is given as an input but the graph does not read it")
            given[k] = inputs[t]
        missing = [p for k, p in info.required.items() if k not in given]
        if missing:
            names = ", ".join(repr(Tensor(p, graph.ctx)) for p in missing[:3])
            raise InputError(f"the graph's input(s) {names}{' ...' if len(missing) > 3 else ''} were not given: "
                             "their memory would be read uninitialised")
        for k, rows, op in info.ids:
            arr = given.get(k)
            if arr is None:
                continue
            a = np.asarray(arr)
            if a.dtype.kind == "f":
                if not np.isfinite(a).all():
                    raise InputError(f"{op}: ids must be integers in [0, {rows}), got NaN or infinite values")
                a = np.trunc(a)      # what writing them into the I32 input does
            elif a.dtype.kind not in "biu":
                continue             # Tensor.set refuses it
            if a.size and (a.min() < 0 or a.max() >= rows):
                bad = a[(a < 0) | (a >= rows)]
                raise InputError(f"{op}: ids must lie in [0, {rows}) (the rows of the table they index), got "
                                 f"{bad.ravel()[:5].tolist()}")
        if check:
            self._check_leafs(graph, info.shape_only)
        (allocator or self.allocator).alloc(graph)
        for t, arr in inputs.items():
            t.set(arr)
        if check:
            for node in graph.nodes():
                if not self.supports(node):
                    raise GGMLError(f"the {self.name} backend cannot compute {node!r}")
        status = lib.ggml_backend_graph_compute(self.ptr, graph.ptr)
        if status != lib.GGML_STATUS_SUCCESS:
            raise GGMLError(f"{self.name}: graph compute failed with status {status}")
        return graph

    def close(self) -> None:
        if self._allocator is not None:
            self._allocator.free()
            self._allocator = None
        if getattr(self, "ptr", ffi.NULL) != ffi.NULL:
            lib.ggml_backend_free(self.ptr)
            self.ptr = ffi.NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def version() -> str:
    return string(lib.ggml_version())


def commit() -> str:
    return string(lib.ggml_commit())


__all__ = ["Backend", "Buffer", "BufferType", "GraphAllocator", "Device", "devices", "backend_names",
           "cuda_available", "cuda_device_count", "version", "commit"]
