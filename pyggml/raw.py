"""The raw layer: ggml's C API exactly as the headers declare it (ggml, ggml-alloc, ggml-backend, ggml-cpu, gguf,
and ggml-cuda when built), generated at build time by cffi from the pinned sources.

    from pyggml.raw import ffi, lib
    ctx = lib.ggml_init({"mem_size": 1 << 20, "mem_buffer": ffi.NULL, "no_alloc": False})

Nothing here checks arguments: ggml's asserts abort the process. The Pythonic layer (pyggml.Context & co.) checks
shapes and types before they reach C.
"""
from ._ggml import ffi, lib

HAS_CUDA = bool(lib.PYGGML_HAS_CUDA)


def string(ptr) -> str:
    """A C string from ggml as str ('' for NULL)."""
    return "" if ptr == ffi.NULL else ffi.string(ptr).decode("utf-8", "replace")


__all__ = ["ffi", "lib", "HAS_CUDA", "string"]
