"""Which pyggml object owns a piece of ggml memory, and whether it is still open.

ggml frees a context's tensors (their descriptions, and in a ``no_alloc=False`` context their data) in
``ggml_free``, and a backend buffer's data in ``ggml_backend_buffer_free``; C pointers into either are dangling
afterwards, and reading them crashes or returns garbage. pyggml's objects therefore know when they are closed:
``Tensor.ptr`` raises ClosedError once its Context is closed, a Graph checks every context it reads, and
``owner_of`` maps a raw tensor pointer (a graph node's source, say) back to the live Context that holds it.
"""
from __future__ import annotations

import bisect
import threading
import weakref

from .errors import ClosedError

_lock = threading.Lock()
_starts: list[int] = []                 # sorted start addresses of the live contexts' memory
_spans: dict[int, tuple[int, weakref.ref]] = {}   # start -> (end, context)


def register(ctx, start: int, size: int) -> None:
    with _lock:
        bisect.insort(_starts, start)
        _spans[start] = (start + size, weakref.ref(ctx))


def unregister(start: int) -> None:
    with _lock:
        if start in _spans:
            del _spans[start]
            _starts.pop(bisect.bisect_left(_starts, start))


def owner_of(address: int):
    """The live Context whose memory holds ``address``, or None (closed, or not pyggml's)."""
    with _lock:
        i = bisect.bisect_right(_starts, address) - 1
        if i < 0:
            return None
        end, ref = _spans[_starts[i]]
    return ref() if address < end else None


class Dead:
    """The owner of a tensor whose context is gone (or was never pyggml's): every use raises ClosedError."""

    _open = False
    _deps: frozenset = frozenset()
    _released = None

    def _closed_message(self) -> str:
        return "the tensor's context was closed (or is not a pyggml Context)"

    def _live(self):
        raise ClosedError(self._closed_message())


DEAD = Dead()

__all__ = ["register", "unregister", "owner_of", "DEAD", "ClosedError"]
