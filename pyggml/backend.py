"""Backends (CPU with a thread count, CUDA when built), their buffers, and graph compute.

    be = Backend("cpu", threads=4)          # or Backend("cuda", device=0)
    weights = be.alloc_tensors(ctx)         # memory for every tensor of a no_alloc context
    out = be.compute(graph)                 # intermediate tensors get memory from a reusable graph allocator
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

from .context import Context
from .errors import BackendUnavailable, GGMLError
from .graph import Graph
from .raw import HAS_CUDA, ffi, lib, string
from .tensor import Tensor


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
    """Backend memory holding the tensors of one context (weights, KV caches, inputs)."""

    def __init__(self, ptr, backend: "Backend", ctx: Context | None):
        self.ptr = ptr
        self.backend = backend
        self.ctx = ctx  # the tensors described there live in this buffer: keep both alive together

    @property
    def size(self) -> int:
        return int(lib.ggml_backend_buffer_get_size(self.ptr)) if self.ptr != ffi.NULL else 0

    @property
    def name(self) -> str:
        return string(lib.ggml_backend_buffer_name(self.ptr))

    @property
    def is_host(self) -> bool:
        return bool(lib.ggml_backend_buffer_is_host(self.ptr))

    def clear(self, value: int = 0) -> None:
        lib.ggml_backend_buffer_clear(self.ptr, value)

    def set_usage_weights(self) -> None:
        """Tell the scheduler-aware backends this buffer holds weights (lets CUDA keep it on the device)."""
        lib.ggml_backend_buffer_set_usage(self.ptr, lib.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)

    def free(self) -> None:
        if getattr(self, "ptr", ffi.NULL) != ffi.NULL:
            lib.ggml_backend_buffer_free(self.ptr)
            self.ptr = ffi.NULL

    def __del__(self):
        self.free()


def _forget_compute_memory(graph: Graph) -> None:
    """Detach what a graph allocator placed: every node (results and views alike: a view of a persistent tensor is
    simply re-initialised from its source) and the input leafs. Their old buffer may be freed already, so it is
    never looked at."""
    input_flag = lib.GGML_TENSOR_FLAG_INPUT
    for t in graph.nodes():
        t.ptr.data = ffi.NULL
        t.ptr.buffer = ffi.NULL
    for t in graph.leafs():
        if t.ptr.flags & input_flag:
            t.ptr.data = ffi.NULL
            t.ptr.buffer = ffi.NULL


class GraphAllocator:
    """Memory for a graph's intermediate tensors, reused (and grown when needed) across graphs."""

    def __init__(self, backend: "Backend"):
        self.backend = backend
        self.ptr = lib.ggml_gallocr_new(lib.ggml_backend_get_default_buffer_type(backend.ptr))
        self._last = None
        if self.ptr == ffi.NULL:
            raise MemoryError("ggml_gallocr_new failed")

    def alloc(self, graph: Graph) -> None:
        # ggml_gallocr_alloc_graph reuses the previous plan whenever the tensor sizes still fit, without comparing
        # the graphs' structure: a plan made for another graph (its in-place reuse of an input, say) can then
        # overlap live tensors. Plan afresh for every new graph; recomputing the same graph keeps its plan.
        last = self._last() if self._last is not None else None
        if last is not graph:
            if getattr(graph, "_placed", False):
                # ggml-alloc skips tensors that already have data: a graph computed before (under another plan or
                # allocator, perhaps in a buffer since freed) would keep stale addresses. Forget them first.
                _forget_compute_memory(graph)
            if not lib.ggml_gallocr_reserve(self.ptr, graph.ptr):
                raise MemoryError(f"{self.backend.name}: could not reserve memory for a graph of "
                                  f"{graph.n_nodes} nodes")
            self._last = weakref.ref(graph)
        if not lib.ggml_gallocr_alloc_graph(self.ptr, graph.ptr):
            raise MemoryError(f"{self.backend.name}: could not allocate memory for a graph of {graph.n_nodes} nodes")
        graph._placed = True

    @property
    def size(self) -> int:
        return int(lib.ggml_gallocr_get_buffer_size(self.ptr, 0))

    def free(self) -> None:
        if getattr(self, "ptr", ffi.NULL) != ffi.NULL:
            lib.ggml_gallocr_free(self.ptr)
            self.ptr = ffi.NULL

    def __del__(self):
        self.free()


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

    @property
    def name(self) -> str:
        return string(lib.ggml_backend_name(self.ptr))

    def set_threads(self, threads: int) -> None:
        if self.kind != "cpu":
            raise ValueError("only the CPU backend takes a thread count")
        threads = int(threads)
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        lib.ggml_backend_cpu_set_n_threads(self.ptr, threads)
        self.threads = threads

    def __repr__(self) -> str:
        extra = f", threads={self.threads}" if self.kind == "cpu" else f", device={self.device}"
        return f"Backend({self.kind!r}{extra})"

    # -- memory ------------------------------------------------------------------------------------------------
    def alloc_tensors(self, ctx: Context, buffer_type: BufferType | None = None) -> Buffer:
        """Allocate every tensor of a ``no_alloc`` context in one buffer of this backend (of ``buffer_type``, one
        of ``extra_buffer_types()``, when given). Write an extra type's tensors whole, with ``Tensor.set`` or
        ggml_backend_tensor_set: that is where they are converted to the kernel's layout."""
        if not ctx.no_alloc:
            raise ValueError("alloc_tensors needs a Context created with no_alloc=True")
        if buffer_type is None:
            ptr = lib.ggml_backend_alloc_ctx_tensors(ctx._live(), self.ptr)
        else:
            if not lib.ggml_backend_supports_buft(self.ptr, buffer_type.ptr):
                raise ValueError(f"the {self.name} backend cannot use {buffer_type.name} memory")
            ptr = lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx._live(), buffer_type.ptr)
        if ptr == ffi.NULL:
            if not ctx.tensors():
                raise ValueError("alloc_tensors: the context has no tensors")
            raise MemoryError(f"{self.name}: could not allocate the context's tensors")
        return Buffer(ptr, self, ctx)

    def extra_buffer_types(self) -> list[BufferType]:
        """The device's extra buffer types (CPU: AMX, CPU_REPACK when this CPU and build have them)."""
        dev = lib.ggml_backend_get_device(self.ptr)
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
        if self._allocator is None:
            self._allocator = GraphAllocator(self)
        return self._allocator

    # -- compute -----------------------------------------------------------------------------------------------
    def supports(self, t: Tensor) -> bool:
        return bool(lib.ggml_backend_supports_op(self.ptr, t.ptr))

    def _check_leafs(self, graph: Graph) -> None:
        for leaf in graph.leafs():
            p = leaf.ptr
            if p.flags & lib.GGML_TENSOR_FLAG_INPUT:
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
        inputs = inputs or {}
        for t in inputs:
            if not t.ptr.flags & lib.GGML_TENSOR_FLAG_INPUT:
                raise GGMLError(f"{t!r} is not marked as a graph input (call .set_input() when creating it), so "
                                "the allocator may have reused its memory")
        if check:
            self._check_leafs(graph)
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
