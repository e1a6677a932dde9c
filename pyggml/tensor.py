"""A Python handle on a ``struct ggml_tensor``, with numpy in and out.

Shapes: ``ne`` is ggml's order (ne[0] is the fastest-varying dimension, always 4 entries); ``shape`` is numpy's order
(``reversed(ne)`` without the trailing unit dimensions beyond ggml_n_dims), so ``t.get().shape == t.shape``.
"""
from __future__ import annotations

import numpy as np

from . import lifetime
from .dtypes import NUMPY_DTYPES, Type, bf16_bits_to_float32, float32_to_bf16_bits, type_name
from .errors import ClosedError, GGMLError, ShapeError
from .raw import ffi, lib, string


class Tensor:
    __slots__ = ("_ptr", "owner", "__weakref__")

    def __init__(self, ptr, owner):
        if ptr == ffi.NULL:
            raise GGMLError("ggml returned a NULL tensor")
        self._ptr = ptr
        self.owner = owner  # keeps the Context (and so the tensor's memory) alive

    @property
    def ptr(self):
        """The ``struct ggml_tensor *``; ClosedError once the tensor's Context is closed (its memory is freed)."""
        if not self.owner._open:
            raise ClosedError(f"tensor used after close: {self.owner._closed_message()}")
        return self._ptr

    # -- description -------------------------------------------------------------------------------------------
    @property
    def ne(self) -> tuple[int, int, int, int]:
        return tuple(self.ptr.ne)

    @property
    def nb(self) -> tuple[int, int, int, int]:
        return tuple(self.ptr.nb)

    @property
    def n_dims(self) -> int:
        return lib.ggml_n_dims(self.ptr)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne[: self.n_dims]))

    @property
    def type(self) -> Type:
        return Type(self.ptr.type)

    @property
    def nelements(self) -> int:
        return lib.ggml_nelements(self.ptr)

    @property
    def nbytes(self) -> int:
        return lib.ggml_nbytes(self.ptr)

    @property
    def op(self) -> str:
        return string(lib.ggml_op_desc(self.ptr))

    @property
    def name(self) -> str:
        return string(lib.ggml_get_name(self.ptr))

    @name.setter
    def name(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a tensor name is a str, not {type(value).__name__}")
        if "\0" in value:
            raise ValueError(f"tensor name {value!r} contains a NUL character")
        raw = value.encode()
        if len(raw) >= lib.GGML_MAX_NAME:
            raise ValueError(f"tensor name {value!r} is longer than {lib.GGML_MAX_NAME - 1} bytes")
        lib.ggml_set_name(self.ptr, raw)

    def named(self, name: str) -> "Tensor":
        self.name = name
        return self

    @property
    def is_contiguous(self) -> bool:
        return bool(lib.ggml_is_contiguous(self.ptr))

    @property
    def is_allocated(self) -> bool:
        return self.ptr.data != ffi.NULL or self.ptr.buffer != ffi.NULL

    @property
    def src(self) -> list["Tensor"]:
        return [Tensor(s, _owner(s, self.owner)) for s in self.ptr.src if s != ffi.NULL]

    def set_input(self) -> "Tensor":
        if self.nelements == 0:
            raise ShapeError(f"{self!r} is empty: ggml's graph allocator cannot place an empty input")
        lib.ggml_set_input(self.ptr)
        return self

    def set_output(self) -> "Tensor":
        lib.ggml_set_output(self.ptr)
        return self

    def __repr__(self) -> str:
        if not self.owner._open:
            return "<Tensor (closed)>"
        name = f" {self.name!r}" if self.name else ""
        return f"<Tensor{name} {type_name(self.type)} ne={self.ne} op={self.op}>"

    def __eq__(self, other) -> bool:
        return isinstance(other, Tensor) and self._ptr == other._ptr

    def __hash__(self) -> int:   # stays valid after close (a closed tensor may still be a dict key)
        return hash(int(ffi.cast("uintptr_t", self._ptr)))

    # -- data --------------------------------------------------------------------------------------------------
    def _check_data_access(self, verb: str) -> None:
        released = self.owner._released
        if released is not None:
            raise ClosedError(f"cannot {verb} {self!r}: {released}")
        if not self.is_allocated:
            raise GGMLError(f"cannot {verb} {self!r}: it has no memory yet (allocate its context in a backend, "
                            "or compute the graph that allocates it)")
        if not self.is_contiguous:
            raise GGMLError(f"cannot {verb} {self!r}: it is not contiguous (use ctx.cont first)")

    @property
    def matmul_layout(self) -> str | None:
        """The CPU extra buffer type (AMX, CPU_REPACK) holding this tensor in a matmul kernel's own layout, or None.
        Such a tensor can only be the weight (first operand) of mul_mat, with a contiguous 2-D second operand."""
        buf = self.ptr.buffer
        if buf == ffi.NULL or lib.ggml_backend_buffer_is_host(buf):
            return None
        buft = lib.ggml_backend_buffer_get_type(buf)
        dev = lib.ggml_backend_buft_get_device(buft)
        if dev == ffi.NULL or lib.ggml_backend_dev_type(dev) != lib.GGML_BACKEND_DEVICE_TYPE_CPU:
            return None
        return string(lib.ggml_backend_buft_name(buft))

    def _coerce(self, array) -> np.ndarray:
        t = self.type
        arr = np.asarray(array)
        want = tuple(reversed(self.ne))
        got = (1,) * (4 - arr.ndim) + arr.shape if arr.ndim <= 4 else arr.shape
        if arr.dtype.kind not in "biuf":
            raise ShapeError(f"cannot write an array of dtype {arr.dtype} into {self!r}: numbers only")
        if t in NUMPY_DTYPES:
            if got != want:
                raise ShapeError(f"array of shape {arr.shape} does not fit {self!r} (numpy shape {self.shape})")
            return np.ascontiguousarray(arr, dtype=NUMPY_DTYPES[t])
        if t == Type.BF16:
            if got != want:
                raise ShapeError(f"array of shape {arr.shape} does not fit {self!r} (numpy shape {self.shape})")
            return np.ascontiguousarray(arr) if arr.dtype == np.uint16 else float32_to_bf16_bits(arr)
        # quantized and other block types travel as raw bytes
        raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        if raw.size != self.nbytes:
            raise ShapeError(f"{type_name(t)} tensor {self!r} takes {self.nbytes} raw bytes, got {raw.size}")
        return raw

    def set(self, array, offset: int = 0) -> "Tensor":
        """Copy a numpy array (or raw bytes, for quantized types) into the tensor."""
        self._check_data_access("write")
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
            raise ShapeError(f"set: offset must be a non-negative integer, got {offset!r}")
        offset = int(offset)
        data = self._coerce(array)
        if data.nbytes + offset > self.nbytes:
            raise ShapeError(f"{data.nbytes} bytes at offset {offset} overflow {self!r} ({self.nbytes} bytes)")
        layout = self.matmul_layout
        if layout and (offset or data.nbytes != self.nbytes):
            raise GGMLError(f"{self!r} is stored in the {layout} matmul layout: write it whole")
        src = ffi.from_buffer(data)
        if self.ptr.buffer != ffi.NULL:
            lib.ggml_backend_tensor_set(self.ptr, src, offset, data.nbytes)
        else:
            ffi.memmove(ffi.cast("char *", self.ptr.data) + offset, src, data.nbytes)
        return self

    def get(self, raw: bool = False) -> np.ndarray:
        """The tensor's data as a new numpy array (float32 for BF16; uint8 bytes for quantized types)."""
        self._check_data_access("read")
        layout = self.matmul_layout
        if layout:
            raise GGMLError(f"{self!r} is stored in the {layout} matmul layout, which cannot be read back")
        t = self.type
        if t in NUMPY_DTYPES:
            out = np.empty(self.shape, dtype=NUMPY_DTYPES[t])
        elif t == Type.BF16:
            out = np.empty(self.shape, dtype=np.uint16)
        else:
            out = np.empty(self.nbytes, dtype=np.uint8)
        dst = ffi.from_buffer(out)
        if self.ptr.buffer != ffi.NULL:
            lib.ggml_backend_tensor_get(self.ptr, dst, 0, self.nbytes)
        else:
            ffi.memmove(dst, self.ptr.data, self.nbytes)
        if t == Type.BF16 and not raw:
            return bf16_bits_to_float32(out)
        return out

    def numpy(self) -> np.ndarray:
        return self.get()


def _owner(ptr, default):
    """The Context holding the tensor at ``ptr`` (a source of a node may live in another context than the node)."""
    if default._open:
        mem = lib.ggml_get_mem_buffer(default.ptr)
        start = int(ffi.cast("uintptr_t", mem))
        if start <= int(ffi.cast("uintptr_t", ptr)) < start + lib.ggml_get_mem_size(default.ptr):
            return default
    found = lifetime.owner_of(int(ffi.cast("uintptr_t", ptr)))
    return found if found is not None else lifetime.DEAD
