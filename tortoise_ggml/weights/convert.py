"""Convert Tortoise's release checkpoints (.pth) into one GGUF file (layout: docs/gguf-format.md).

    python -m tortoise_ggml.convert MODELS_DIR -o tortoise.gguf [--type f32|f16|q8_0] [--components a,b]
                                    [--voices DIR]

The only module that needs torch (``pip install tortoise-ggml[convert]``). Every checkpoint is validated against its
component's key/shape table (its registry entry: tortoise_ggml.weights.registry) before a byte is written; the file
is written to a temporary name and renamed at the end, so a failed conversion leaves nothing behind.

Memory: checkpoints are memory-mapped and read twice (shapes first, then one tensor at a time while writing), so the
peak is about one component's checkpoint plus one converted tensor, not the whole model.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import threading
from dataclasses import dataclass

import numpy as np

from ..models.config import AudioConfig, AutoregressiveConfig
from .checkpoints import CheckpointError, weight_norm_pairs
from .names import (
    ARCHITECTURE,
    FORMAT_VERSION,
    MAX_NAME_BYTES,
    MEL_NORMS_TENSOR,
    VOICE_PARTS,
    tensor_name,
    voice_tensor_name,
)
from .registry import COMPONENTS, Q8_0_BLOCK, REGISTRY, Component

log = logging.getLogger(__name__)

TYPES = ("f32", "f16", "q8_0")


class ConvertError(ValueError):
    """A user-facing conversion failure (bad directory, unreadable file, bad option); the message names it."""


# ------------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ------------------------------------------------------------------------------------------------------------------
def _torch():
    try:
        import torch
    except ImportError:
        raise ConvertError("converting .pth checkpoints needs torch: pip install 'tortoise-ggml[convert]'") from None
    return torch


def _load_pth(path: str):
    torch = _torch()
    try:
        # mmap keeps a 1.7 GB checkpoint out of RAM until each tensor is read; legacy (non-zip) files cannot be
        # mapped and are read whole
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises many types for damaged files (RuntimeError, UnpicklingError, EOFError...)
        raise ConvertError(f"{path}: cannot read checkpoint: {type(e).__name__}: {e}") from None


def load_state_dict(component: Component, path: str) -> dict:
    """The checkpoint's state dict, as tortoise/api.py reads it (vocoder.pth wraps it in {'model_g': ...})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint for {component.name} not found")
    obj = _load_pth(path)
    if component.state_dict_in and isinstance(obj, dict) and component.state_dict_in in obj:
        obj = obj[component.state_dict_in]
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a state dict, found {type(obj).__name__}")
    torch = _torch()
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ConvertError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return obj


def _folded_shapes(sd: dict, pairs: dict) -> dict:
    folded = {k: tuple(v.shape) for k, v in sd.items()}
    for base, (g, v) in pairs.items():
        folded[base] = folded.pop(v)
        del folded[g]
    return folded


def read_config(models_dir: str) -> dict:
    """Per-component constructor kwargs from ``MODELS_DIR/config.json`` ({} when absent); accepts
    ``{"configs": {component: kwargs}}`` (tests/reference/oracle.py writes that) or ``{component: kwargs}``."""
    path = os.path.join(models_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: cannot read: {e}") from None
    data = data.get("configs", data) if isinstance(data, dict) else None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for k, v in data.items() if k in COMPONENTS):
        raise ConvertError(f"{path}: expected {{component: {{constructor argument: value}}}}")
    return {k: v for k, v in data.items() if k in COMPONENTS}


# ------------------------------------------------------------------------------------------------------------------
# Planning: what goes in the file, decided from shapes alone
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class TensorPlan:
    key: str
    name: str
    shape: tuple  # numpy order, as stored
    type: str     # 'f32' | 'f16' | 'q8_0'

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape, dtype=np.int64))
        return {"f32": 4 * n, "f16": 2 * n, "q8_0": n // Q8_0_BLOCK * 34}[self.type]


@dataclass
class ComponentPlan:
    component: str
    path: str
    hparams: dict
    tensors: list


def plan_component(component: Component, path: str, config: dict, type: str) -> ComponentPlan:
    sd = load_state_dict(component, path)
    pairs = weight_norm_pairs(sd.keys(), path)
    shapes = _folded_shapes(sd, pairs)
    hparams, ignored = component.validate(shapes, path, config)
    for k, why in ignored.items():
        if why.startswith("alias of ") and not _torch().equal(sd[k], sd[why[len("alias of "):]]):
            raise CheckpointError(f"{path}: {k!r} should duplicate {why[len('alias of '):]!r} but holds other values")
    if ignored:
        log.info("%s: ignoring %d keys (%s)", os.path.basename(path), len(ignored),
                 ", ".join(sorted(set(ignored.values())))[:120])
    for k, v in sd.items():
        if k not in ignored and not v.is_floating_point():
            raise CheckpointError(f"{path}: key {k!r} holds {v.dtype} values, expected floating point")
    tensors = []
    for key, shape in shapes.items():
        if key in ignored:
            continue
        stored = component.stored_shape(key, shape, type)
        tensors.append(TensorPlan(key, tensor_name(component.name, key), stored,
                                  component.storage_type(key, stored, type)))
    del sd
    return ComponentPlan(component.name, path, hparams, tensors)


# ------------------------------------------------------------------------------------------------------------------
# Tensor data
# ------------------------------------------------------------------------------------------------------------------
def _folded_tensor(sd: dict, key: str, pairs: dict):
    torch = _torch()
    if key in pairs:
        g, v = pairs[key]
        # what nn.utils.remove_weight_norm computes (dim=0 is weight_norm's default, used by UnivNet everywhere)
        return torch._weight_norm(sd[v].float(), sd[g].float(), 0)
    return sd[key]


F16_MAX = 65504.0  # the largest finite float16 (also bounds a q8_0 block's scale, amax / 127)


def check_finite(arr: np.ndarray, source: str, what: str) -> None:
    """ConvertError unless every value is finite: a NaN or infinity in a weight would silently spread through every
    result computed from it."""
    if not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ConvertError(f"{source}: {what} holds {bad} NaN or infinite value(s) of {arr.size}: refusing to "
                           "convert a damaged checkpoint")


def tensor_data(component: Component, sd: dict, plan: TensorPlan, pairs: dict, source: str = "") -> np.ndarray:
    """The bytes to store for one tensor: folded, laid out for ggml, converted to the planned type. Refuses
    (ConvertError) non-finite values, and values the planned type cannot hold."""
    import gguf
    t = _folded_tensor(sd, plan.key, pairs)
    if component.transposed is not None and component.transposed.match(plan.key):
        t = t.t()
    arr = np.ascontiguousarray(t.detach().float().numpy()).reshape(plan.shape)
    source = source or component.checkpoint
    check_finite(arr, source, f"key {plan.key!r}")
    limit = {"f16": F16_MAX, "q8_0": F16_MAX * 127}.get(plan.type)
    if limit is not None and arr.size and float(np.abs(arr).max()) > limit:
        raise ConvertError(f"{source}: key {plan.key!r} holds values up to {float(np.abs(arr).max()):.4g}, beyond "
                           f"what {plan.type} stores (they would become infinite): convert with --type f32")
    if plan.type == "f16":
        return arr.astype(np.float16)
    if plan.type == "q8_0":
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
    return arr


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer, mel norms, voices
# ------------------------------------------------------------------------------------------------------------------
def _tortoise_data_dir() -> str | None:
    # find_spec locates the installed package without importing it (tortoise's __init__ chain pulls in torchaudio)
    try:
        spec = importlib.util.find_spec("tortoise")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _find_asset(models_dir: str, name: str) -> str:
    here = os.path.join(models_dir, name)
    if os.path.isfile(here):
        return here
    data = _tortoise_data_dir()
    if data and os.path.isfile(os.path.join(data, name)):
        return os.path.join(data, name)
    raise FileNotFoundError(f"{name} not found in {models_dir} nor in an installed tortoise-tts package "
                            f"(tortoise/data/{name}): copy it into {models_dir}")


def read_tokenizer(models_dir: str) -> str:
    path = _find_asset(models_dir, "tokenizer.json")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        json.loads(text)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: not a readable tokenizer JSON file: {e}") from None
    return text


def read_mel_norms(models_dir: str, n_mels: int) -> np.ndarray:
    """The per-channel norms of the autoregressive conditioning mels (one per conditioning_spec_dim channel)."""
    path = _find_asset(models_dir, "mel_norms.pth")
    obj = _load_pth(path)
    torch = _torch()
    if not isinstance(obj, torch.Tensor) or obj.numel() != n_mels:
        raise ConvertError(f"{path}: expected a tensor of {n_mels} mel norms, found "
                           f"{tuple(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__}")
    norms = obj.detach().float().numpy().reshape(n_mels).copy()
    check_finite(norms, path, "the mel norms")
    if (norms == 0).any():
        raise ConvertError(f"{path}: a mel norm is 0, and the conditioning mels are divided by them")
    return norms


def read_voices(voices_dir: str, models_dir: str | None = None,
                work_dir: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """{voice: {'autoregressive': latent, 'diffusion': latent}} from a tortoise voices dir (``DIR/NAME/*.wav|mp3|
    flac`` or ``DIR/NAME/*.pth``; tortoise_ggml.voices). A sub-dir holding one latents file (.pth: tortoise's
    precomputed conditioning latents, or .npz) gives them as saved. A sub-dir of audio clips gets them computed by
    tortoise-ggml's own conditioning path from the checkpoints in ``models_dir`` (voices.latents_from_checkpoints:
    their autoregressive and diffusion components, converted at f32 to a temporary GGUF file in ``work_dir``)."""
    from ..voices import VoiceError, latents_from_checkpoints, scan_voices_dir
    try:
        found = scan_voices_dir(voices_dir)
        for voice in found:
            for part in VOICE_PARTS:
                name = voice_tensor_name(voice, part)
                if len(name.encode()) > MAX_NAME_BYTES:
                    raise ConvertError(f"{os.path.join(voices_dir, voice)}: voice name {voice!r} is too long for "
                                       f"ggml tensor names ({name!r})")
            if "&" in voice or "," in voice:
                log.warning("voice %s: '&' and ',' join voice names on the command line: rename it to use it there",
                            voice)
        clip_voices = {n: v.clips for n, v in found.items() if v.clips}
        computed = {}
        if clip_voices:
            needed = [REGISTRY[c].checkpoint for c in ("autoregressive", "diffusion")]
            if models_dir is None or not all(os.path.isfile(os.path.join(models_dir, f)) for f in needed):
                raise ConvertError(f"voices {', '.join(clip_voices)} are audio clips: computing their latents needs "
                                   f"{' and '.join(needed)} in the models directory")
            log.info("computing the latents of %d clip voices", len(clip_voices))
            computed = latents_from_checkpoints(models_dir, clip_voices, work_dir or models_dir)
    except VoiceError as e:
        raise ConvertError(str(e)) from None
    return {name: dict(zip(VOICE_PARTS, computed[name] if v.clips else v.latents)) for name, v in found.items()}


# ------------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------------
def _add_value(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        if -(2 ** 31) <= value < 2 ** 31:
            writer.add_int32(key, value)
        else:
            writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float64(key, value)  # float64 so 0.2 reads back as 0.2
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(x, int) and not isinstance(x, bool)
                                                            for x in value):
        writer.add_array(key, list(value))
    elif isinstance(value, (list, tuple)) and value and all(isinstance(x, str) for x in value):
        writer.add_array(key, list(value))
    else:
        raise ConvertError(f"metadata {key}: cannot store {value!r}")


_GGUF_TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}


def _resolve_components(components, models_dir: str | None = None) -> list[str]:
    """The components to convert, in release order. None: every required component, and each optional one
    (registry ``optional``, e.g. hifigan) whose checkpoint is in ``models_dir``."""
    if components is None:
        return [c for c in COMPONENTS if not REGISTRY[c].optional or models_dir is None
                or os.path.isfile(os.path.join(models_dir, REGISTRY[c].checkpoint))]
    if isinstance(components, str):
        components = [c.strip() for c in components.split(",") if c.strip()]
    components = list(dict.fromkeys(components))
    bad = [c for c in components if c not in COMPONENTS]
    if bad or not components:
        raise ConvertError(f"unknown component(s) {', '.join(bad) or '(none given)'}: choose from "
                           f"{', '.join(COMPONENTS)}")
    return [c for c in COMPONENTS if c in components]


def _same_path(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _refuse_overwriting_inputs(out_path: str, models_dir: str, components, voices_dir) -> None:
    """ConvertError when the output (or its temporary .part) would replace one of the conversion's inputs, or any
    checkpoint of the models dir (converted this time or not)."""
    inputs = [models_dir] + [os.path.join(models_dir, REGISTRY[c].checkpoint) for c in REGISTRY]
    inputs += [os.path.join(models_dir, name) for name in ("config.json", "tokenizer.json", "mel_norms.pth")]
    for name in ("tokenizer.json", "mel_norms.pth"):
        try:
            inputs.append(_find_asset(models_dir, name))
        except FileNotFoundError:
            pass
    if voices_dir is not None:
        inputs.append(os.fspath(voices_dir))
    for out in (out_path, out_path + ".part"):
        if os.path.isdir(out):
            raise ConvertError(f"{out}: the output is a directory: name the GGUF file to write")
        for path in inputs:
            if _same_path(out, path):
                raise ConvertError(f"{out}: the output would overwrite the conversion's input {path}: choose another "
                                   "output file")
        if voices_dir is not None and os.path.realpath(out).startswith(os.path.realpath(voices_dir) + os.sep):
            raise ConvertError(f"{out}: the output would be written into the voices directory {voices_dir}")


class _Termination:
    """SIGTERM and SIGHUP raise SystemExit(128 + signal) while the output is written, so that its .part file is
    removed as on Ctrl-C; while cleaning up, they (and Ctrl-C) wait until the cleanup is done. Only the main thread
    can install signal handlers: elsewhere this does nothing."""

    SIGNALS = ("SIGTERM", "SIGHUP")

    def __init__(self):
        self.pending: int | None = None
        self.quiet = False
        self.previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.quiet or self.pending is not None:
            self.pending = self.pending or signum
            return
        self.pending = signum
        raise SystemExit(128 + signum)

    def cleaning(self) -> None:
        self.quiet = True
        if self.previous and signal.SIGINT not in self.previous:
            self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)

    def restore(self) -> None:
        previous, self.previous = self.previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if self.pending is not None:
            log.warning("conversion stopped by signal %d", self.pending)
            if self.quiet:
                raise SystemExit(128 + self.pending)


def convert(models_dir, out_path, type: str = "f32", components=None, voices_dir=None) -> str:
    """Convert the checkpoints in ``models_dir`` into the GGUF file ``out_path``; returns ``out_path``.

    ``type``: f32, or f16 / q8_0 for the 2-D weight matrices (everything else stays F32). ``components``: a subset
    (list or comma-separated string) of tortoise_ggml.weights.registry.COMPONENTS; default all the required ones,
    each of whose checkpoint files must exist, plus the optional ones (hifigan: hifidecoder.pth) found in
    ``models_dir``. ``voices_dir``: a tortoise voices dir whose voices are stored too (read_voices: saved
    latents as they are, clip folders' latents computed from the checkpoints).
    """
    import gguf
    models_dir, out_path = os.fspath(models_dir), os.fspath(out_path)
    if type not in TYPES:
        raise ConvertError(f"unknown type {type!r}: choose from {', '.join(TYPES)}")
    if not os.path.isdir(models_dir):
        raise FileNotFoundError(f"{models_dir}: models directory not found")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"{out_dir}: output directory not found")
    components = _resolve_components(components, models_dir)
    missing = [REGISTRY[c].checkpoint for c in components
               if not os.path.isfile(os.path.join(models_dir, REGISTRY[c].checkpoint))]
    if missing:
        raise FileNotFoundError(f"{models_dir}: missing checkpoint file(s) {', '.join(missing)} (convert a subset "
                                f"with --components)")
    _refuse_overwriting_inputs(out_path, models_dir, components, voices_dir)
    config = read_config(models_dir)
    tokenizer_json = read_tokenizer(models_dir)
    if voices_dir is not None and not os.path.isdir(voices_dir):
        raise FileNotFoundError(f"{voices_dir}: voices directory not found")

    plans = []
    for c in components:
        path = os.path.join(models_dir, REGISTRY[c].checkpoint)
        plans.append(plan_component(REGISTRY[c], path, config.get(c, {}), type))
        log.info("%-15s %4d tensors  %s", c, len(plans[-1].tensors), os.path.basename(path))
    ar = next((p.hparams for p in plans if p.component == "autoregressive"), {})
    mel_norms = read_mel_norms(models_dir, ar.get("conditioning_spec_dim",
                                                  AutoregressiveConfig.conditioning_spec_dim))
    # after the checkpoints are validated: clip voices convert and run the conditioning models
    voices = read_voices(os.fspath(voices_dir), models_dir, out_dir) if voices_dir is not None else {}
    for voice, parts in voices.items():
        for part, arr in parts.items():
            check_finite(np.asarray(arr), os.path.join(os.fspath(voices_dir), voice), f"the {part} latent")

    tmp = out_path + ".part"
    term, writer = _Termination(), None
    try:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        writer.add_uint32(f"{ARCHITECTURE}.format_version", FORMAT_VERSION)
        writer.add_string(f"{ARCHITECTURE}.type", type)
        writer.add_array(f"{ARCHITECTURE}.components", [p.component for p in plans])
        writer.add_string(f"{ARCHITECTURE}.tokenizer.json", tokenizer_json)
        if voices:
            writer.add_array(f"{ARCHITECTURE}.voices", list(voices))
        for k, v in AudioConfig().to_metadata().items():
            _add_value(writer, f"{ARCHITECTURE}.{AudioConfig.component}.{k}", v)
        for p in plans:
            base = f"{ARCHITECTURE}.{p.component}"
            writer.add_string(f"{base}.file", os.path.basename(p.path))
            writer.add_array(f"{base}.keys", [t.key for t in p.tensors])
            for k, v in p.hparams.items():
                _add_value(writer, f"{base}.{k}", v)

        def info(name, shape, type_, nbytes):
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType[_GGUF_TYPES[type_]])

        info(MEL_NORMS_TENSOR, mel_norms.shape, "f32", mel_norms.nbytes)
        for voice, parts in voices.items():
            for part, arr in parts.items():
                info(voice_tensor_name(voice, part), arr.shape, "f32", arr.nbytes)
        for p in plans:
            for t in p.tensors:
                info(t.name, t.shape, t.type, t.nbytes)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.write_tensor_data(mel_norms)
        for parts in voices.values():
            for arr in parts.values():
                writer.write_tensor_data(arr)
        for p in plans:
            sd = load_state_dict(REGISTRY[p.component], p.path)
            pairs = weight_norm_pairs(sd.keys(), p.path)
            for t in p.tensors:
                writer.write_tensor_data(tensor_data(REGISTRY[p.component], sd, t, pairs, p.path))
            del sd
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        term.cleaning()   # a second SIGTERM (or Ctrl-C) must not stop the cleanup half way
        try:
            if writer is not None:
                writer.close()
        except Exception:  # the writer may be in any state when interrupted
            pass
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        term.restore()
    log.info("wrote %s (%.1f MB)", out_path, os.path.getsize(out_path) / 1e6)
    return out_path
