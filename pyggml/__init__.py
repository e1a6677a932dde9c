"""pyggml: Python bindings to ggml.

``pyggml.raw`` is the C API as the headers declare it (cffi, generated at build time); the names here are a thin
Pythonic layer over it: contexts that build graphs with checked ops, tensors with numpy in and out, backends that
allocate and compute, graph print and DOT export, and ggml's logs routed to the ``pyggml.ggml`` logger.

Bad input raises instead of reaching one of ggml's asserts (which abort the process) or reading freed memory:
ShapeError (shapes, types, layouts and scalar arguments an op or its CPU kernel cannot take, sizes that overflow),
InputError (graph inputs left out, not part of the graph, or ids out of their table's range), ClosedError (a
Context, Backend, Buffer or model file, or a tensor or graph living in one, used after close) and OutOfMemory /
OutOfContextMemory; all are GGMLError. tests/pyggml/test_fuzz.py drives random ops, shapes, types and layouts
through this layer and checks each against numpy or for one of these errors.
"""
from pkgutil import extend_path

# Run from a source checkout (python -m ... in the repository root), this directory shadows the installed package,
# which alone holds the compiled extension: let the package span both, so that pyggml._ggml is found.
__path__ = extend_path(__path__, __name__)

from . import log  # noqa: E402
from .backend import (
                      Backend,
                      Buffer,
                      BufferType,
                      Device,
                      GraphAllocator,
                      backend_names,
                      commit,
                      cuda_available,
                      cuda_device_count,
                      devices,
                      version,
)
from .context import Context
from .dtypes import Type
from .errors import (
                     BackendUnavailable,
                     ClosedError,
                     GGMLError,
                     InputError,
                     OutOfContextMemory,
                     OutOfMemory,
                     ShapeError,
)
from .graph import CachedGraph, Graph, Inputs
from .raw import HAS_CUDA
from .tensor import Tensor

log.install()

__all__ = ["Backend", "Buffer", "BufferType", "GraphAllocator", "Device", "devices", "backend_names",
           "cuda_available", "cuda_device_count", "version", "commit", "Context", "Graph", "Inputs", "CachedGraph",
           "Tensor", "Type", "GGMLError", "ShapeError", "ClosedError", "InputError", "BackendUnavailable",
           "OutOfContextMemory", "OutOfMemory", "HAS_CUDA", "log"]
