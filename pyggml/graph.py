"""``Graph``: a ggml compute graph, with ggml_graph_print's text and Graphviz DOT export."""
from __future__ import annotations

import os
import tempfile

from . import log
from .context import Context
from .errors import ClosedError, OutOfContextMemory
from .raw import ffi, lib
from .tensor import Tensor, _owner


def _reachable(outputs: list[Tensor]) -> int:
    """Number of distinct tensors the outputs depend on: an upper bound on nodes + leafs, to size the graph."""
    seen, stack = set(), [o.ptr for o in outputs]
    while stack:
        p = stack.pop()
        key = int(ffi.cast("uintptr_t", p))
        if key in seen:
            continue
        seen.add(key)
        stack.extend(s for s in p.src if s != ffi.NULL)
        if p.view_src != ffi.NULL:
            stack.append(p.view_src)
    return len(seen)


class Graph:
    """The forward graph computing ``outputs``; built in ``ctx``, sized to fit."""

    def __init__(self, ctx: Context, *outputs: Tensor, size: int | None = None):
        if not outputs:
            raise ValueError("a graph needs at least one output tensor")
        for o in outputs:
            if not isinstance(o, Tensor):
                raise TypeError(f"graph outputs must be Tensors, not {type(o).__name__}")
        ctx._live()
        self._contexts = {ctx} | {o.owner for o in outputs}
        self._check_contexts()   # before following a source pointer into freed memory
        need = _reachable(list(outputs))
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 1 << 40):
            raise ValueError(f"graph size must be a non-negative integer below 2**40, got {size!r}")
        size = max(size or 0, need, lib.GGML_DEFAULT_GRAPH_SIZE)
        overhead = lib.ggml_graph_overhead_custom(size, False)
        free = ctx.mem_size - ctx.used_mem
        if overhead > free:
            raise OutOfContextMemory(f"a graph of {size} nodes needs {overhead} bytes of context memory, "
                                     f"{free} left (create the Context with a larger graph_size)")
        self.ctx = ctx
        self.size = size
        self.outputs = list(outputs)
        self.ptr = lib.ggml_new_graph_custom(ctx._live(), size, False)
        for o in outputs:
            lib.ggml_build_forward_expand(self.ptr, o.ptr)

    # -- lifetime ----------------------------------------------------------------------------------------------
    def dependencies(self) -> set:
        """Every Context the graph's tensors live in (its own, and those of the weights and caches it reads)."""
        out = set()
        for c in self._contexts:
            out |= c.dependencies()
        return out

    def _check_contexts(self) -> None:
        """ClosedError when the graph's context, or one whose tensors it reads, was closed or lost its memory."""
        for c in self.dependencies():
            if not c._open:
                raise ClosedError(f"the graph reads tensors of a closed context: {c._closed_message()}")
            if c._released is not None:
                raise ClosedError(f"the graph reads tensors whose memory is gone: {c._released}")

    @property
    def ptr(self):
        if not self.ctx._open:
            raise ClosedError(f"graph used after close: {self.ctx._closed_message()}")
        return self._ptr

    @ptr.setter
    def ptr(self, value) -> None:
        self._ptr = value

    # -- structure -----------------------------------------------------------------------------------------------
    @property
    def n_nodes(self) -> int:
        return lib.ggml_graph_n_nodes(self.ptr)

    def nodes(self) -> list[Tensor]:
        self._check_contexts()
        g = self.ptr
        return [Tensor(lib.ggml_graph_node(g, i), self.ctx) for i in range(lib.ggml_graph_n_nodes(g))]

    def leafs(self) -> list[Tensor]:
        """Tensors the graph reads but does not compute (weights, inputs)."""
        nodes = self.nodes()
        keys = {int(ffi.cast("uintptr_t", n._ptr)) for n in nodes}
        seen, out = set(), []
        for n in nodes:
            for s in n._ptr.src:
                key = int(ffi.cast("uintptr_t", s)) if s != ffi.NULL else 0
                if key and key not in keys and key not in seen:
                    seen.add(key)
                    out.append(Tensor(s, _owner(s, self.ctx)))
        return out

    def print(self, file=None) -> str:
        """ggml_graph_print's report: printed (to ``file``, default stdout) and returned."""
        text = str(self)
        print(text, end="", file=file)
        return text

    def __str__(self) -> str:
        """ggml_graph_print's report."""
        self._check_contexts()
        with log.capture() as buf:
            lib.ggml_graph_print(self.ptr)
        return "".join(buf)

    def to_dot(self, path: str | os.PathLike | None = None) -> str:
        """Graphviz DOT source of the graph (ggml_graph_dump_dot); also written to ``path`` when given."""
        self._check_contexts()
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "graph.dot")
            lib.ggml_graph_dump_dot(self.ptr, ffi.NULL, out.encode())
            with open(out) as f:
                text = f.read()
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text


class Inputs:
    """The inputs of one graph: tensors made with ``add`` (marked as inputs) and the arrays to write into them, plus
    constant tables made once per key (``table``) and shared by every op of the graph that needs them."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.feed: dict = {}
        self._tables: dict = {}

    def add(self, array, type=None, name: str | None = None) -> Tensor:
        """A graph input holding ``array`` (numpy order); ``type`` defaults to the array's (f32 / i32)."""
        import numpy as np
        array = np.asarray(array)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"a graph input holds numbers, got an array of dtype {array.dtype}")
        if type is None:
            type = "i32" if array.dtype.kind in "iu" else "f16" if array.dtype == np.float16 else "f32"
        t = self.ctx.new_tensor(type, tuple(reversed(array.shape)) or (1,), name).set_input()
        self.feed[t] = array
        return t

    def table(self, key, make, type=None) -> Tensor:
        """The input made from ``make()`` the first time ``key`` is asked for; the same tensor afterwards."""
        if key not in self._tables:
            self._tables[key] = self.add(make(), type)
        return self._tables[key]

    def set(self, t: Tensor, array) -> None:
        """New data for an input of a graph that is computed again."""
        if t not in self.feed:
            raise KeyError(f"{t!r} is not an input of this graph")
        self.feed[t] = array


class CachedGraph:
    """One graph kept for reuse: built when first asked for a key, computed again with new inputs while the key
    stays the same (building and planning a large graph costs milliseconds per call), rebuilt when it changes.

        graphs = CachedGraph(backend)
        out, = graphs.compute(("step", x.shape), build, x=x)      # build(ctx, inputs) -> ({name: input}, outputs)

    ``build`` may return a third item: tensors the graph computes first, in that order, without keeping them.
    """

    def __init__(self, backend, **context_sizes):
        self.backend = backend
        self._sizes = context_sizes  # max_tensors, graph_size of the graphs' Context
        self._key = None
        self._entry = None
        self.n_nodes = 0

    def compute(self, key, build, **arrays) -> list[Tensor]:
        """The outputs of the graph for ``key`` after computing it on ``arrays`` (by the names ``build`` gave its
        per-call inputs)."""
        first = self._entry is None or self._key != key
        if first:
            self._entry = self._key = None  # free the old graph before building the next
            ctx = Context(**self._sizes)
            inputs = Inputs(ctx)
            built = build(ctx, inputs)
            if not isinstance(built, tuple) or len(built) not in (2, 3) or not isinstance(built[0], dict):
                raise TypeError("a CachedGraph build returns ({name: input tensor}, outputs[, first]), got "
                                f"{type(built).__name__}")
            named, outputs, *before = built
            outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
            if not all(isinstance(o, Tensor) for o in outputs):
                raise TypeError("a CachedGraph build's outputs must be pyggml Tensors")
            for out in outputs:
                out.set_output()  # else the allocator may reuse an output's memory for a later node
            # ``first``: tensors to schedule before the outputs (their memory stays reusable)
            graph = Graph(ctx, *(before[0] if before else ()), *outputs)
            self._entry, self._key = (ctx, inputs, named, outputs, graph), key
        ctx, inputs, named, outputs, graph = self._entry
        missing = set(named) - set(arrays)
        if missing or set(arrays) - set(named):
            raise KeyError(f"the graph takes inputs {sorted(named)}, got {sorted(arrays)}")
        for name, array in arrays.items():
            inputs.set(named[name], array)
        self.n_nodes = graph.n_nodes
        # the per-node checks (leaf memory, backend support) run when the graph is first computed
        self.backend.compute(graph, inputs.feed, check=first)
        return outputs

    def clear(self) -> None:
        self._entry = self._key = None
