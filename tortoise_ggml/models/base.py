"""The contract every tortoise-ggml model follows.

    model = DiffusionTts(model_file, backend)    # the weights of the file's component, its typed config
    model.config                                 # e.g. DiffusionConfig, read from the file's metadata
    y = model.build(ctx, inputs, x, ...)         # adds the model's ops to a graph (tensors in, tensors out)
    out = model.forward(x_array, ...)            # numpy in, numpy out (a cached graph where shapes repeat)

The model keeps its model file alive (the weights live in the file's backend buffer). Tortoise's own methods
(get_conditioning, inference_speech, timestep_independent, ...) are numpy-level too and keep the reference's names.
"""
from __future__ import annotations

from typing import ClassVar

import pyggml as pg

from .arch_util import ModuleWeights
from .config import Config


class Model:
    component: ClassVar[str] = ""  # the registry entry whose weights and config the model reads

    def __init__(self, model_file, backend: pg.Backend | None = None, component: str | None = None):
        self.component = component or type(self).component
        self.model_file = model_file  # owns the buffer the weights live in: keep it alive as long as we are
        self.backend = backend or model_file.backend
        self.config: Config = model_file.config(self.component)
        self.weights = ModuleWeights(model_file.weights(self.component), self.component)
        self.graphs = pg.CachedGraph(self.backend)

    @property
    def last_graph_nodes(self) -> int:
        """Nodes of the graph computed last (benchmarks report it)."""
        return self.graphs.n_nodes

    def compute(self, *outputs: pg.Tensor, inputs: pg.Inputs) -> list[pg.Tensor]:
        """Compute a one-off graph (shapes that rarely repeat) and return its outputs."""
        for out in outputs:
            out.set_output()  # else the allocator may reuse an output's memory for a later node
        graph = pg.Graph(inputs.ctx, *outputs)
        self.backend.compute(graph, inputs.feed)
        self.graphs.n_nodes = graph.n_nodes
        return list(outputs)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.component} on {self.backend!r}>"


__all__ = ["Model"]
