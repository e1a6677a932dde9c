"""Load a tortoise-ggml GGUF file (docs/gguf-format.md) into one backend buffer.

    be = pyggml.Backend("cpu")
    with ModelFile("tortoise.gguf", be, components=["vocoder"]) as mf:
        hp = mf.hparams("vocoder")                      # {'noise_dim': 64, 'strides': [8, 8, 4], ...}
        w = mf.weights("vocoder")["conv_pre.weight"]    # pyggml.Tensor in the backend, original state-dict key

The file is memory-mapped (gguf.GGUFReader) and each tensor's bytes are copied once, straight from the map into
the backend buffer. On a CPU with AMX (Intel Xeon 4th gen and later), the q8_0 matmul weights go to a second buffer
in the AMX kernels' own layout (3x the int8 throughput of the plain q8_0 dot products); ``repack=False`` keeps
every tensor in the plain layout. No torch and no tortoise-tts here.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

import pyggml as pg
from pyggml.raw import ffi, lib

from ..models.config import AudioConfig, Config, ConfigError
from .checkpoints import summary
from .names import (
    ARCHITECTURE,
    FORMAT_VERSION,
    MEL_NORMS_TENSOR,
    VOICE_PARTS,
    TensorNameError,
    tensor_name,
    voice_tensor_name,
)
from .registry import REGISTRY

_PER_COMPONENT_INTERNAL = ("keys", "file")  # per-component metadata that is not a hyperparameter
_AMX_TILE = 32  # ggml-cpu/amx: weights need rows (K) and a row count (N) that are multiples of 32 (supports_op)
FILE_TYPES = ("f32", "f16", "q8_0")  # tortoise.type: what the converter's --type wrote
# hyperparameters that count repeated blocks (layers, depths): a value above the file's tensor count cannot describe
# it, and would only make the key table huge
_COUNTS = ("layers", "depth", "blocks")


class ModelFileClosed(pg.ClosedError, KeyError):
    """A closed ModelFile was asked for its weights or tensors (a KeyError too: ``weights()`` raised that before)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Weights(Mapping):
    """One component's tensors by original state-dict key."""

    def __init__(self, component: str, tensors: dict[str, pg.Tensor]):
        self.component = component
        self._tensors = tensors
        self._closed: str | None = None

    def __getitem__(self, key: str) -> pg.Tensor:
        if self._closed:
            raise ModelFileClosed(f"{self._closed}: its {self.component} weights are gone")
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"{self.component} has no weight {key!r}") from None

    def close(self, reason: str) -> None:
        self._closed = reason

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"<Weights {self.component}: {len(self)} tensors>"


def _open_reader(path: str):
    import gguf
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors for damaged files
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field_value(field):
    import gguf
    value = field.contents()
    if field.types and field.types[0] == gguf.GGUFValueType.BOOL:
        return bool(value)
    return value


def _type_name(ggml_type: int) -> str:
    import gguf
    try:
        return gguf.GGMLQuantizationType(int(ggml_type)).name.lower()
    except ValueError:
        return f"unknown type {int(ggml_type)}"


def _squeeze(shape) -> tuple:
    """A shape with its leading 1s dropped (ggml does not tell (1, n) from (n,))."""
    shape = tuple(shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


class ModelFile:
    """A tortoise-ggml GGUF file with the tensors of ``components`` (default: all in the file) in ``backend``."""

    def __init__(self, path, backend: pg.Backend, components=None, repack: bool = True):
        self.path = os.fspath(path)
        if not isinstance(backend, pg.Backend):
            raise TypeError(f"ModelFile needs a pyggml.Backend to load into, not {type(backend).__name__}")
        self.backend = backend
        self._closed = False
        self._ctx = self._matmul_ctx = None
        self.buffer = self.matmul_buffer = None
        self._weights: dict[str, Weights] = {}
        self._configs: dict[str, Config] = {}
        self._reader = _open_reader(self.path)
        self.metadata = self._read_metadata()
        self._check_header()
        self.available_components = self._component_list()
        self.components = self._select(components)
        self._by_name = {t.name: t for t in self._reader.tensors}
        self._check_extents()
        self.file_type: str | None = None   # tortoise.type, read with the first component's key list
        # every loaded component: its config, and each tensor's presence, shape and type against the registry's
        # table for that config, before a byte is copied
        self._plan = {c: self._check_component(c) for c in self.components}
        self._check_mel_norms()
        self.audio_config  # noqa: B018  (ConfigError now for bad tortoise.audio.* values, not at first use)
        self._load(self._matmul_layout() if repack else None)

    # -- validation ----------------------------------------------------------------------------------------------
    def _read_metadata(self) -> dict:
        out = {}
        for name, field in self._reader.fields.items():
            if name.startswith("GGUF."):
                continue
            try:
                out[name] = _field_value(field)
            except UnicodeDecodeError as e:
                raise ValueError(f"{self.path}: metadata {name!r} is not valid UTF-8 text ({e.reason} at byte "
                                 f"{e.start}): the file is corrupted") from None
            except Exception as e:  # gguf raises IndexError, ValueError, numpy errors for damaged values
                raise ValueError(f"{self.path}: metadata {name!r} cannot be read ({type(e).__name__}: {e}): the file "
                                 "is corrupted") from None
        return out

    def _component_list(self) -> list[str]:
        value = self.metadata[f"{ARCHITECTURE}.components"]
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise ValueError(f"{self.path}: metadata {ARCHITECTURE}.components is {value!r}, expected a list of "
                             "component names")
        unknown = [c for c in value if c not in REGISTRY]
        if unknown:
            raise ValueError(f"{self.path}: metadata {ARCHITECTURE}.components names {', '.join(map(repr, unknown))}, "
                             f"which this tortoise-ggml does not know (it knows {', '.join(REGISTRY)})")
        if len(set(value)) != len(value):
            raise ValueError(f"{self.path}: metadata {ARCHITECTURE}.components lists a component twice: {value}")
        return list(value)

    def _file_type(self) -> str:
        key = f"{ARCHITECTURE}.type"
        value = self.metadata.get(key)
        if value not in FILE_TYPES:
            raise ValueError(f"{self.path}: metadata {key} is {value!r}, expected one of {', '.join(FILE_TYPES)}")
        return value

    def _check_component(self, component: str) -> list[tuple[str, object]]:
        """The component's (key, tensor) pairs, each checked against what the registry says its config stores."""
        entry = REGISTRY[component]
        keys = self.metadata.get(f"{ARCHITECTURE}.{component}.keys")
        if not keys:
            raise ValueError(f"{self.path}: no key list for {component}")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"{self.path}: metadata {ARCHITECTURE}.{component}.keys is not a list of strings")
        key_set = set(keys)
        if len(key_set) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"{self.path}: {component} lists key {dup!r} twice")
        if self.file_type is None:
            self.file_type = self._file_type()
        config = self.config(component)
        hp = {**self.hparams(component), **config.to_metadata()}
        for name, value in hp.items():
            if (any(w in name for w in _COUNTS) and isinstance(value, int) and not isinstance(value, bool)
                    and value > len(keys)):
                raise ConfigError(f"{self.path}: metadata {ARCHITECTURE}.{component}.{name}={value} cannot describe "
                                  f"the {len(keys)} {component} tensors of the file")
        try:
            expected = entry.keys(hp)
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
            raise ConfigError(f"{self.path}: the {component} metadata does not describe a model "
                              f"({type(e).__name__}: {e})") from None
        # the block counts first: they decide which keys exist
        ordered = dict(sorted(hp.items(), key=lambda kv: not any(w in kv[0] for w in _COUNTS)))
        described = f"the {component} model its metadata describes ({summary(ordered)})"
        unknown = [k for k in keys if k not in expected]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise ValueError(f"{self.path}: {component} holds key {unknown[0]!r}{more}, which is not part of "
                             f"{described}: metadata and tensors disagree")
        missing = [k for k in expected if k not in key_set]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"{self.path}: {component} has no key {missing[0]!r}{more}, which {described} needs: "
                             "metadata and tensors disagree")
        out = []
        for key in keys:
            try:
                name = tensor_name(component, key)
            except TensorNameError as e:
                raise ValueError(f"{self.path}: {e}") from None
            rt = self._by_name.get(name)
            if rt is None:
                raise ValueError(f"{self.path}: {component} key {key!r} has no tensor {name!r}")
            want = entry.stored_shape(key, tuple(expected[key]), self.file_type)
            got = tuple(int(x) for x in reversed(rt.shape))
            if _squeeze(got) != _squeeze(want):
                raise ValueError(f"{self.path}: {component} tensor {name!r} (key {key!r}) has shape {got}, "
                                 f"{described} stores it as {want}")
            want_type = entry.storage_type(key, want, self.file_type)
            got_type = _type_name(rt.tensor_type)
            # an F32 matrix in an f16/q8_0 file is fine (every model reads F32 weights); anything else is not
            if got_type != want_type and not (got_type == "f32" and want_type in ("f16", "q8_0")):
                raise ValueError(f"{self.path}: {component} tensor {name!r} (key {key!r}) is stored as {got_type}, "
                                 f"expected {want_type} in a {self.file_type} file")
            out.append((key, rt))
        return out

    def _check_mel_norms(self) -> None:
        rt = self._by_name.get(MEL_NORMS_TENSOR)
        if rt is None:
            return
        if _type_name(rt.tensor_type) != "f32":
            raise ValueError(f"{self.path}: tensor {MEL_NORMS_TENSOR!r} is stored as {_type_name(rt.tensor_type)}, "
                             "expected f32")
        if "autoregressive" in self.components:
            n = self.config("autoregressive").conditioning_spec_dim
            if int(np.prod([int(x) for x in rt.shape])) != n:
                raise ValueError(f"{self.path}: tensor {MEL_NORMS_TENSOR!r} has shape "
                                 f"{tuple(int(x) for x in reversed(rt.shape))}, expected {n} values (the "
                                 "autoregressive conditioning_spec_dim)")

    def _check_header(self) -> None:
        arch = self.metadata.get("general.architecture")
        if arch != ARCHITECTURE:
            raise ValueError(f"{self.path}: general.architecture is {arch!r}, not {ARCHITECTURE!r}: not a "
                             "tortoise-ggml file")
        version = self.metadata.get(f"{ARCHITECTURE}.format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{self.path}: format version {version!r}, this tortoise-ggml reads version "
                             f"{FORMAT_VERSION}: reconvert the checkpoints with python -m tortoise_ggml.convert")
        if f"{ARCHITECTURE}.components" not in self.metadata:
            raise ValueError(f"{self.path}: no {ARCHITECTURE}.components metadata")

    def _select(self, components) -> list[str]:
        if components is None:
            return list(self.available_components)
        if isinstance(components, str):
            components = [components]
        components = list(dict.fromkeys(components))
        missing = [c for c in components if c not in self.available_components]
        if missing:
            raise ValueError(f"{self.path}: holds no {', '.join(missing)} (it has "
                             f"{', '.join(self.available_components)})")
        return components

    def _check_extents(self) -> None:
        size = os.path.getsize(self.path)
        for t in self._reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ValueError(f"{self.path}: tensor {t.name!r} runs past the end of the file (truncated?)")

    # -- loading -------------------------------------------------------------------------------------------------
    def _component_tensors(self, component: str) -> list[tuple[str, object]]:
        return self._plan[component]

    def _matmul_layout(self) -> pg.BufferType | None:
        if self.backend.kind != "cpu":
            return None
        return next((bt for bt in self.backend.extra_buffer_types() if bt.name == "AMX"), None)

    @staticmethod
    def _in_matmul_layout(component: str, key: str, rt) -> bool:
        if int(rt.tensor_type) != lib.GGML_TYPE_Q8_0 or len(rt.shape) != 2 or REGISTRY[component].is_gathered(key):
            return False
        return all(int(x) % _AMX_TILE == 0 for x in rt.shape)

    def _load(self, layout: pg.BufferType | None) -> None:
        plan = [(c, key, rt) for c in self.components for key, rt in self._component_tensors(c)]
        fast = [layout is not None and self._in_matmul_layout(c, key, rt) for c, key, rt in plan]
        n_fast = sum(fast)
        n_plain = len(plan) - n_fast
        if n_plain:
            self._ctx = pg.Context(lib.ggml_tensor_overhead() * (n_plain + 1) + 4096, max_tensors=n_plain + 1)
        if n_fast:
            self._matmul_ctx = pg.Context(lib.ggml_tensor_overhead() * (n_fast + 1) + 4096, max_tensors=n_fast + 1)
        tensors = {c: {} for c in self.components}
        plain, repacked = [], []
        for (c, key, rt), f in zip(plan, fast):
            t = (self._matmul_ctx if f else self._ctx).new_tensor(int(rt.tensor_type), [int(x) for x in rt.shape],
                                                                  rt.name)
            if t.nbytes != rt.n_bytes:
                raise ValueError(f"{self.path}: tensor {rt.name!r} holds {rt.n_bytes} bytes, its shape and type "
                                 f"need {t.nbytes}")
            tensors[c][key] = t
            (repacked if f else plain).append((t, rt))
        self._weights = {c: Weights(c, tensors[c]) for c in self.components}
        if plain:
            self.buffer = self.backend.alloc_tensors(self._ctx)
            self.buffer.set_usage_weights()
        if repacked:
            self.matmul_buffer = self.backend.alloc_tensors(self._matmul_ctx, layout)
            self.matmul_buffer.set_usage_weights()
        with open(self.path, "rb", buffering=0) as f:
            if self.buffer is not None and self.buffer.is_host:
                # read straight into backend memory: one copy, and no mapped file pages adding the model's size
                # to the process's resident memory a second time
                for t, rt in plain:
                    self._read_into(f, rt, ffi.buffer(t.ptr.data, rt.n_bytes))
            else:
                for t, rt in plain:  # device memory: one copy from the file mapping
                    lib.ggml_backend_tensor_set(t.ptr, ffi.from_buffer(rt.data), 0, rt.n_bytes)
            staging = bytearray(max((rt.n_bytes for _, rt in repacked), default=0))
            for t, rt in repacked:  # the buffer converts each whole tensor to its layout as it is written
                self._read_into(f, rt, memoryview(staging)[:rt.n_bytes])
                lib.ggml_backend_tensor_set(t.ptr, ffi.from_buffer(staging), 0, rt.n_bytes)

    def _read_into(self, f, rt, dst) -> None:
        view, done = memoryview(dst), 0
        while done < rt.n_bytes:
            n = os.preadv(f.fileno(), [view[done:]], rt.data_offset + done)
            if n <= 0:
                raise ValueError(f"{self.path}: tensor {rt.name!r} runs past the end of the file (truncated?)")
            done += n

    # -- access --------------------------------------------------------------------------------------------------
    def hparams(self, component: str) -> dict:
        """The component's hyperparameters (python ints, floats, bools, lists), named as tortoise's constructor
        arguments."""
        if component not in self.available_components:
            raise KeyError(f"{self.path} holds no {component!r} (it has {', '.join(self.available_components)})")
        return self._group(component)

    def _group(self, name: str) -> dict:
        prefix = f"{ARCHITECTURE}.{name}."
        return {k[len(prefix):]: v for k, v in self.metadata.items()
                if k.startswith(prefix) and k[len(prefix):] not in _PER_COMPONENT_INTERNAL}

    def config(self, component: str) -> Config:
        """The component's typed config (tortoise_ggml.models.config), checked: ConfigError names a missing,
        mis-typed or out-of-range metadata key."""
        if component not in self._configs:
            entry = REGISTRY[component]
            try:
                self._configs[component] = entry.config.from_metadata(self.hparams(component), self.path, component)
            except ConfigError:
                raise
            except (TypeError, ValueError, KeyError) as e:  # a value of a type the config's checks do not expect
                raise ConfigError(f"{self.path}: the {component} metadata does not make a config "
                                  f"({type(e).__name__}: {e})") from None
        return self._configs[component]

    @property
    def audio_config(self) -> AudioConfig:
        """Sample rates and clip lengths (``tortoise.audio.*``; tortoise's values for files that predate them)."""
        if "audio" not in self._configs:
            self._configs["audio"] = AudioConfig.from_metadata(self._group("audio"), self.path)
        return self._configs["audio"]

    def _open(self, what: str = "tensors") -> None:
        if self._closed:
            raise ModelFileClosed(f"{self.path}: the model file was closed: its {what} are gone")

    def weights(self, component: str) -> Weights:
        self._open("weights")
        try:
            return self._weights[component]
        except KeyError:
            known = "loaded" if component in REGISTRY else "a tortoise component"
            raise KeyError(f"{component!r} is not {known} (loaded: {', '.join(self.components)})") from None

    @property
    def nbytes(self) -> int:
        """Backend memory the loaded weights take (both layouts)."""
        return sum(b.size for b in (self.buffer, self.matmul_buffer) if b is not None)

    @property
    def tokenizer_json(self) -> str:
        return self.metadata[f"{ARCHITECTURE}.tokenizer.json"]

    def _array(self, name: str) -> np.ndarray:
        self._open()
        t = self._by_name.get(name)
        if t is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        if _type_name(t.tensor_type) not in ("f32", "f16"):
            raise ValueError(f"{self.path}: tensor {name!r} is stored as {_type_name(t.tensor_type)}, expected f32")
        return np.array(t.data, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))

    @property
    def mel_norms(self) -> np.ndarray:
        return self._array(MEL_NORMS_TENSOR)

    @property
    def voices(self) -> list[str]:
        return list(self.metadata.get(f"{ARCHITECTURE}.voices", []))

    def voice(self, name: str) -> dict[str, np.ndarray]:
        """A stored voice's conditioning latents: {'autoregressive': (1, d), 'diffusion': (1, 2*c)}."""
        if name not in self.voices:
            raise KeyError(f"no voice {name!r} in {self.path} (voices: {', '.join(self.voices) or 'none'})")
        return {part: self._array(voice_tensor_name(name, part)) for part in VOICE_PARTS}

    # -- lifetime ------------------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Free the backend buffer and unmap the file. The weights() tensors, and any model or graph reading them,
        raise pyggml.ClosedError afterwards."""
        self._closed = True
        reason = f"the model file {self.path} was closed"
        for w in self._weights.values():
            w.close(reason)
        self._weights = {}
        for buf in (self.buffer, self.matmul_buffer):
            if buf is not None:
                buf.free(reason)
        self.buffer = self.matmul_buffer = None
        for ctx in (self._ctx, self._matmul_ctx):
            if ctx is not None:
                ctx.close(reason)
        self._ctx = self._matmul_ctx = None
        self._by_name = {}
        self._plan = {}
        self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<ModelFile {self.path!r} components={self.components} backend={self.backend!r}>"


__all__ = ["ModelFile", "ModelFileClosed", "Weights", "ARCHITECTURE", "FORMAT_VERSION", "FILE_TYPES"]
