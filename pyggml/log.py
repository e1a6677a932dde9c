"""ggml's log output routed to Python logging, and its abort message surfaced before the process dies.

ggml logs through one process-wide callback, in pieces (GGML_LOG_LEVEL_CONT continues the previous message), so
pieces are joined into lines before they reach the ``pyggml.ggml`` logger. ``capture()`` collects the raw text
instead, which is how ``Graph.print()`` returns ``ggml_graph_print``'s output as a string.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading

from .raw import ffi, lib

logger = logging.getLogger("pyggml.ggml")

_LEVELS = {
    lib.GGML_LOG_LEVEL_NONE: logging.INFO,
    lib.GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    lib.GGML_LOG_LEVEL_INFO: logging.INFO,
    lib.GGML_LOG_LEVEL_WARN: logging.WARNING,
    lib.GGML_LOG_LEVEL_ERROR: logging.ERROR,
}

_lock = threading.Lock()
_pending: list[str] = []
_pending_level = logging.INFO
_captures: list[list[str]] = []
last_abort_message: str | None = None


def _emit(level: int, text: str) -> None:
    global _pending_level
    if level == lib.GGML_LOG_LEVEL_CONT:
        _pending.append(text)
    else:
        _flush()
        _pending_level = _LEVELS.get(level, logging.INFO)
        _pending.append(text)
    if text.endswith("\n"):
        _flush()


def _flush() -> None:
    if _pending:
        msg = "".join(_pending).rstrip("\n")
        _pending.clear()
        if msg:
            logger.log(_pending_level, msg)


@ffi.def_extern()
def _pyggml_log_callback(level, text, user_data):
    s = ffi.string(text).decode("utf-8", "replace")
    with _lock:
        if _captures:
            _captures[-1].append(s)
        else:
            _emit(level, s)


@ffi.def_extern()
def _pyggml_abort_callback(error_message):
    # ggml calls abort() right after this returns: all we can do is make sure the reason is seen.
    global last_abort_message
    last_abort_message = ffi.string(error_message).decode("utf-8", "replace")
    try:
        logger.critical("ggml aborted: %s", last_abort_message)
    finally:
        sys.stderr.write(f"pyggml: ggml aborted: {last_abort_message}\n")
        sys.stderr.flush()


@contextlib.contextmanager
def capture():
    """Collect ggml's log text written inside the block: ``with capture() as out: ...; "".join(out)``."""
    buf: list[str] = []
    with _lock:
        _captures.append(buf)
    try:
        yield buf
    finally:
        with _lock:
            _captures.remove(buf)


def install() -> None:
    lib.ggml_log_set(lib._pyggml_log_callback, ffi.NULL)
    lib.ggml_set_abort_callback(lib._pyggml_abort_callback)
