"""Exceptions raised instead of letting ggml assert (which aborts the process)."""


class GGMLError(RuntimeError):
    """A ggml call failed or would fail."""


class ShapeError(GGMLError, ValueError):
    """Tensor shapes or types that the requested op cannot take."""


class BackendUnavailable(GGMLError):
    """The requested backend is not compiled in, or has no device."""


class OutOfMemory(GGMLError, MemoryError):
    """Memory for a context, a backend buffer or a graph could not be had."""


class OutOfContextMemory(OutOfMemory):
    """The ggml context has no room left for another tensor or graph."""


class ClosedError(GGMLError):
    """A Context, Backend, Buffer or model file (or a tensor or graph that lives in one) was used after close():
    raised instead of reading freed memory."""


class InputError(GGMLError, ValueError):
    """Graph inputs the graph cannot take: an input left out, a tensor that is no input of the graph, or ids out
    of the range of the table they index (ggml would read uninitialised memory, or abort)."""
