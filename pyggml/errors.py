"""Exceptions raised instead of letting ggml assert (which aborts the process)."""


class GGMLError(RuntimeError):
    """A ggml call failed or would fail."""


class ShapeError(GGMLError, ValueError):
    """Tensor shapes or types that the requested op cannot take."""


class BackendUnavailable(GGMLError):
    """The requested backend is not compiled in, or has no device."""


class OutOfContextMemory(GGMLError, MemoryError):
    """The ggml context has no room left for another tensor or graph."""
