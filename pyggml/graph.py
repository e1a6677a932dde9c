"""``Graph``: a ggml compute graph, with ggml_graph_print's text and Graphviz DOT export."""
from __future__ import annotations

import os
import tempfile

from . import log
from .context import Context
from .errors import OutOfContextMemory
from .raw import ffi, lib
from .tensor import Tensor


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
        need = _reachable(list(outputs))
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

    @property
    def n_nodes(self) -> int:
        return lib.ggml_graph_n_nodes(self.ptr)

    def nodes(self) -> list[Tensor]:
        return [Tensor(lib.ggml_graph_node(self.ptr, i), self.ctx) for i in range(self.n_nodes)]

    def leafs(self) -> list[Tensor]:
        """Tensors the graph reads but does not compute (weights, inputs)."""
        nodes = {int(ffi.cast("uintptr_t", n.ptr)) for n in self.nodes()}
        seen, out = set(), []
        for n in self.nodes():
            for s in n.ptr.src:
                key = int(ffi.cast("uintptr_t", s)) if s != ffi.NULL else 0
                if key and key not in nodes and key not in seen:
                    seen.add(key)
                    out.append(Tensor(s, self.ctx))
        return out

    def print(self, file=None) -> str:
        """ggml_graph_print's report: printed (to ``file``, default stdout) and returned."""
        with log.capture() as buf:
            lib.ggml_graph_print(self.ptr)
        text = "".join(buf)
        print(text, end="", file=file)
        return text

    def __str__(self) -> str:
        with log.capture() as buf:
            lib.ggml_graph_print(self.ptr)
        return "".join(buf)

    def to_dot(self, path: str | os.PathLike | None = None) -> str:
        """Graphviz DOT source of the graph (ggml_graph_dump_dot); also written to ``path`` when given."""
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "graph.dot")
            lib.ggml_graph_dump_dot(self.ptr, ffi.NULL, out.encode())
            with open(out) as f:
                text = f.read()
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text
