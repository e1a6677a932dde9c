"""Voices as tortoise users know them (tortoise/utils/audio.py get_voices, load_voice, load_voices).

A voice is one of:

* ``random``: the random-latent generators draw one (tortoise's ``random``);
* a folder of clips (``.wav .mp3 .flac .ogg``, any sample rate), named by its path or by its name under a voices
  dir (``--voices-dir``, tortoise's ``extra_voice_dirs``; tortoise's layout ``DIR/NAME/*.wav``);
* a folder holding one saved latents file (``DIR/NAME/NAME.pth``, tortoise's precomputed voices, or ``.npz``);
* a latents file itself (``me.npz`` from ``python -m tortoise_ggml.get_conditioning_latents``, or tortoise's
  ``.pth``), or a single clip;
* a name stored in the model file (``convert --voices DIR``), which plays the role of tortoise's built-in voices:
  a voices-dir folder of the same name wins, as tortoise's extra_voice_dirs override its built-in ones.

``"a&b"`` mixes voices as tortoise's load_voices does: clip voices pool their clips (the conditioning latents are
then computed over all of them), latent voices average their autoregressive and their diffusion latents; a mix of
both kinds is refused, as tortoise refuses it, and ``random`` in a mix gives a random voice.

Latents files: ``.npz`` holds ``autoregressive`` (1, model_dim) and ``diffusion`` (1, 2*model_channels) float32
arrays; ``.pth`` is tortoise's ``torch.save((autoregressive, diffusion))`` and needs torch to read or write.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from .utils.files import atomic_path

log = logging.getLogger(__name__)

RANDOM = "random"
AUDIO_EXTS = (".wav", ".mp3", ".flac", ".ogg")
LATENT_EXTS = (".npz", ".pth")
PARTS = ("autoregressive", "diffusion")   # weights.names.VOICE_PARTS: the two conditioning latents
# clips longer than the conditioning window are cropped at random: a voice made once (convert --voices) uses this
# seed, so the stored latents do not depend on the run
CROP_SEED = 0


class VoiceError(ValueError):
    """A voice that cannot be found or read; the message says what exists."""


@dataclass
class Voice:
    """A resolved voice: clips (paths) or latents (autoregressive, diffusion), or neither for random."""
    name: str
    source: str                                   # random | folder | file | model file
    clips: list[str] = field(default_factory=list)
    latents: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def is_random(self) -> bool:
        return self.source == RANDOM


# ------------------------------------------------------------------------------------------------------------------
# latents files
# ------------------------------------------------------------------------------------------------------------------
def _pair(ar, diff, where: str) -> tuple[np.ndarray, np.ndarray]:
    out = []
    for part, a in zip(PARTS, (ar, diff)):
        a = np.asarray(a)
        if a.dtype.kind != "f" or a.size == 0 or a.ndim > 2 or (a.ndim == 2 and a.shape[0] != 1):
            raise VoiceError(f"{where}: the {part} latent has shape {a.shape} ({a.dtype}), expected (1, width) "
                             "floats")
        if not np.isfinite(a).all():
            raise VoiceError(f"{where}: the {part} latent holds NaN or infinite values")
        out.append(np.ascontiguousarray(a, np.float32).reshape(1, -1))
    return out[0], out[1]


def _torch(what: str):
    try:
        import torch
    except ImportError:
        raise VoiceError(f"{what} needs torch (tortoise's .pth format): pip install torch, or use the .npz format "
                         "(python -m tortoise_ggml.get_conditioning_latents -o NAME.npz)") from None
    return torch


def load_latents(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(autoregressive latent (1, d), diffusion latent (1, 2c)) from a ``.npz`` or tortoise's ``.pth`` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VoiceError(f"no latents file at {path!r}")
    if path.lower().endswith(".pth"):
        torch = _torch(f"reading {path!r}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for damaged files
            raise VoiceError(f"{path}: cannot read: {type(e).__name__}: {e}") from None
        if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj)):
            raise VoiceError(f"{path}: expected (autoregressive latent, diffusion latent) tensors, as tortoise's "
                             "get_conditioning_latents.py saves them")
        return _pair(*(t.detach().float().cpu().numpy() for t in obj), where=path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [p for p in PARTS if p not in z.files]
            if missing:
                raise VoiceError(f"{path}: no {', '.join(missing)} array (it holds {', '.join(z.files) or 'none'}); "
                                 f"a latents file holds {' and '.join(PARTS)}")
            return _pair(z["autoregressive"], z["diffusion"], where=path)
    except VoiceError:
        raise
    except Exception as e:  # not a zip, damaged, object arrays
        raise VoiceError(f"{path}: not a readable .npz latents file ({type(e).__name__}: {e})") from None


def save_latents(path: str | os.PathLike, latents) -> str:
    """Write (autoregressive, diffusion) latents to ``path``: ``.npz``, or ``.pth`` as tortoise's
    get_conditioning_latents.py does (torch tensors, which tortoise's load_voice reads). Written to a temporary
    name and renamed, so a failed write leaves no partial file."""
    path = os.fspath(path)
    ar, diff = _pair(*latents, where=path)
    if not path.lower().endswith(LATENT_EXTS):
        raise VoiceError(f"{path}: latents files end in .npz (or .pth, tortoise's format)")
    torch = _torch(f"writing {path!r}") if path.lower().endswith(".pth") else None
    with atomic_path(path) as tmp:
        if torch is not None:
            torch.save((torch.from_numpy(ar), torch.from_numpy(diff)), tmp)
        else:
            with open(tmp, "wb") as f:
                np.savez(f, autoregressive=ar, diffusion=diff)
    return path


# ------------------------------------------------------------------------------------------------------------------
# finding voices
# ------------------------------------------------------------------------------------------------------------------
def _files(folder: str, exts) -> list[str]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise VoiceError(f"cannot read voice folder {folder!r}: {e.strerror}") from None
    return [e.path for e in entries if e.name.lower().endswith(exts) and not e.name.startswith(".") and e.is_file()]


def folder_voice(folder: str, name: str | None = None) -> Voice:
    """The voice in ``folder``: its clips, or else its one latents file (tortoise's load_voice: one .pth alone
    is a precomputed voice)."""
    name = name or os.path.basename(os.path.normpath(folder))
    clips = _files(folder, AUDIO_EXTS)
    latent_files = _files(folder, LATENT_EXTS)
    if clips:
        if latent_files:
            log.info("voice %s: using its %d clips, not %s", name, len(clips), os.path.basename(latent_files[0]))
        return Voice(name, "folder", clips=clips)
    if len(latent_files) == 1:
        return Voice(name, "folder", latents=load_latents(latent_files[0]))
    if latent_files:
        raise VoiceError(f"voice folder {folder!r} holds several latents files "
                         f"({', '.join(os.path.basename(p) for p in latent_files)}) and no clips: keep one")
    raise VoiceError(f"voice folder {folder!r} holds no audio clips ({' '.join(AUDIO_EXTS)}) and no latents file "
                     f"({' '.join(LATENT_EXTS)})")


def _model_file(source):
    """A TextToSpeech's model file, a ModelFile itself, or None."""
    return getattr(source, "model_file", source)


def get_voices(model_file=None, extra_voice_dirs=()) -> dict[str, str]:
    """Every voice known by name: {name: where} (the model file's stored voices, then each voices dir's folders;
    a later dir overrides an earlier one, as tortoise's get_voices does)."""
    mf = _model_file(model_file)
    voices = {v: "model file" for v in (mf.voices if mf is not None else [])}
    for d in extra_voice_dirs or ():
        if not os.path.isdir(d):
            raise VoiceError(f"voices dir {d!r} not found")
        for sub in sorted(os.listdir(d)):
            if os.path.isdir(os.path.join(d, sub)) and not sub.startswith("."):
                voices[sub] = os.path.join(d, sub)
    return voices


def find_voice(name: str, model_file=None, extra_voice_dirs=()) -> Voice:
    """One voice by name (no '&' mixing): random, a path (latents file, clip, folder), a voices-dir folder, or a
    voice stored in the model file. An unknown name raises VoiceError listing the voices that exist."""
    if not isinstance(name, str) or not name.strip():
        raise VoiceError("the voice name is empty")
    name = name.strip()
    if name == RANDOM:
        return Voice(RANDOM, RANDOM)
    if os.path.isfile(name):
        if name.lower().endswith(LATENT_EXTS):
            return Voice(os.path.splitext(os.path.basename(name))[0], "file", latents=load_latents(name))
        if name.lower().endswith(AUDIO_EXTS):
            return Voice(os.path.splitext(os.path.basename(name))[0], "file", clips=[name])
        raise VoiceError(f"voice file {name!r} is neither a clip ({' '.join(AUDIO_EXTS)}) nor a latents file "
                         f"({' '.join(LATENT_EXTS)})")
    if os.path.isdir(name):
        return folder_voice(name)
    for d in reversed(list(extra_voice_dirs or ())):
        sub = os.path.join(d, name)
        if os.sep not in name and "/" not in name and name not in (".", "..") and os.path.isdir(sub):
            return folder_voice(sub, name)
    mf = _model_file(model_file)
    if mf is not None and name in mf.voices:
        stored = mf.voice(name)
        return Voice(name, "model file", latents=_pair(stored["autoregressive"], stored["diffusion"], where=name))
    known = get_voices(mf, extra_voice_dirs)
    listed = ", ".join(sorted(known)[:60]) + (f", ... ({len(known)} in all)" if len(known) > 60 else "")
    where = [f"the model file stores {'voices' if mf is not None and mf.voices else 'no voices'}"]
    if extra_voice_dirs:
        where.append(f"voices dirs: {', '.join(extra_voice_dirs)}")
    raise VoiceError(f"unknown voice {name!r}: not a folder or file, and not a known voice name ("
                     f"{'; '.join(where)}). Known voices: random" + (f", {listed}" if listed else "")
                     + ". A voice is a folder of clips, a name stored in the model file (convert --voices DIR) "
                     "or under --voices-dir, or a .npz/.pth latents file")


def split_voices(spec: str) -> list[str]:
    """read.py's --voice: a comma list of voices, one run each (a path holding ',' is taken whole)."""
    spec = (spec or "").strip()
    if not spec:
        raise VoiceError("no voice given")
    if os.path.exists(spec):
        return [spec]
    voices = [v.strip() for v in spec.split(",")]
    if any(not v for v in voices):
        raise VoiceError(f"empty voice name in {spec!r}")
    return voices


def _mix_names(spec: str) -> list[str]:
    if os.path.exists(spec) or "&" not in spec:
        return [spec]
    names = [v.strip() for v in spec.split("&")]
    if any(not v for v in names):
        raise VoiceError(f"empty voice name in the mix {spec!r}")
    return names


def _check_width(latents, mf, where: str):
    """The latents must fit the model file's autoregressive and diffusion widths."""
    if mf is None:
        return
    widths = {}
    if "autoregressive" in mf.available_components:
        widths["autoregressive"] = mf.config("autoregressive").model_dim
    if "diffusion" in mf.available_components:
        widths["diffusion"] = 2 * mf.config("diffusion").model_channels
    for part, lat in zip(PARTS, latents):
        if part in widths and lat.shape[-1] != widths[part]:
            raise VoiceError(f"voice {where}: its {part} latent is {lat.shape[-1]} wide, this model's is "
                             f"{widths[part]} (latents made with another model?)")


def read_clips(name: str, paths, sampling_rate: int) -> list:
    """A voice's clips as load_audio reads them, in order; the first that cannot be read is a VoiceError naming
    the voice."""
    from .utils.audio import load_audio  # the audio front-end only when clips are read
    try:
        return [load_audio(p, sampling_rate) for p in paths]
    except (ValueError, OSError) as e:
        raise VoiceError(f"voice {name!r}: {e}") from None


def load_voices(spec: str, model_file=None, extra_voice_dirs=(), sampling_rate: int | None = None):
    """tortoise's load_voices for one --voice value (``"a&b"`` mixes): (clips, latents), one of them None, or
    (None, None) for random. clips: 22.05 kHz float32 arrays (1, samples) (``sampling_rate``: the model file's
    input rate by default); latents: (autoregressive (1, d), diffusion (1, 2c)) float32, averaged over the mixed
    voices as tortoise does (torch.stack(...).mean(0))."""
    mf = _model_file(model_file)
    if sampling_rate is None:
        sampling_rate = mf.audio_config.input_sample_rate if mf is not None else 22050
    names = _mix_names(spec)
    voices = [find_voice(n, mf, extra_voice_dirs) for n in names]
    if any(v.is_random for v in voices):
        if len(voices) > 1:
            log.warning("cannot combine a random voice with other voices: using a random voice")
        return None, None
    kinds = {"clips" if v.clips else "latents" for v in voices}
    if len(kinds) > 1:
        raise VoiceError(f"voice {spec!r} mixes clip voices ({', '.join(v.name for v in voices if v.clips)}) with "
                         f"latent voices ({', '.join(v.name for v in voices if not v.clips)}): as in tortoise, "
                         "combine clips with clips or latents with latents (save a clip voice's latents with python "
                         "-m tortoise_ggml.get_conditioning_latents, then mix the .npz files)")
    if kinds == {"clips"}:
        return [wav for v in voices for wav in read_clips(v.name, v.clips, sampling_rate)], None
    for v in voices:
        _check_width(v.latents, mf, repr(v.name))
    if len(voices) == 1:
        return None, voices[0].latents
    ar = np.stack([v.latents[0] for v in voices], axis=0).mean(axis=0, dtype=np.float32)
    diff = np.stack([v.latents[1] for v in voices], axis=0).mean(axis=0, dtype=np.float32)
    return None, (ar, diff)


def conditioning_latents(tts, spec: str, extra_voice_dirs=(), seed=CROP_SEED):
    """The (autoregressive, diffusion) latents of voice ``spec`` (clips go through tts.get_conditioning_latents,
    cropped with ``seed``); a random voice draws them with ``seed``."""
    clips, latents = load_voices(spec, tts, extra_voice_dirs)
    if clips is not None:
        return tts.get_conditioning_latents(clips, seed=seed)
    if latents is None:
        return tts.get_random_conditioning_latents(seed=seed)
    return latents


# ------------------------------------------------------------------------------------------------------------------
# convert --voices
# ------------------------------------------------------------------------------------------------------------------
def scan_voices_dir(voices_dir: str) -> dict[str, Voice]:
    """Every voice folder of a tortoise voices dir (``DIR/NAME/*.wav|mp3|flac`` or ``DIR/NAME/*.pth|npz``), by
    name. Folders that hold neither are skipped (and logged)."""
    if not os.path.isdir(voices_dir):
        raise FileNotFoundError(f"{voices_dir}: voices directory not found")
    out = {}
    for name in sorted(os.listdir(voices_dir)):
        sub = os.path.join(voices_dir, name)
        if not os.path.isdir(sub) or name.startswith("."):
            continue
        try:
            out[name] = folder_voice(sub, name)
        except VoiceError as e:
            if "holds no audio clips" not in str(e):
                raise
            log.warning("voice %s: no clips and no latents file, skipped", name)
    return out


def latents_from_checkpoints(models_dir: str, clip_voices: dict[str, list[str]], work_dir: str,
                             threads: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Conditioning latents of clip voices {name: [clip paths]}, computed by tortoise-ggml's own conditioning path
    (TextToSpeech.get_conditioning_latents) from the checkpoints in ``models_dir``: their autoregressive and
    diffusion components are converted at f32 to a temporary GGUF file in ``work_dir`` (removed afterwards), so the
    latents are the full-precision ones whatever type the final file has. Each voice's clips longer than 6 s are
    cropped with CROP_SEED."""
    import tempfile

    from .api import TextToSpeech
    from .weights.convert import convert

    out = {}
    with tempfile.TemporaryDirectory(prefix=".voices-", dir=work_dir) as tmp:
        path = convert(models_dir, os.path.join(tmp, "conditioning.gguf"), "f32",
                       components=["autoregressive", "diffusion"])
        tts = TextToSpeech(path, threads=threads, components=["autoregressive", "diffusion"])
        rate = tts.audio_config.input_sample_rate
        try:
            for name, clips in clip_voices.items():
                wavs = read_clips(name, clips, rate)
                out[name] = _pair(*tts.get_conditioning_latents(wavs, seed=CROP_SEED), where=name)
                log.info("voice %s: latents from %d clips", name, len(clips))
        finally:
            tts.model_file.close()
    return out


__all__ = ["RANDOM", "AUDIO_EXTS", "LATENT_EXTS", "CROP_SEED", "Voice", "VoiceError", "load_latents", "save_latents",
           "folder_voice", "get_voices", "find_voice", "split_voices", "load_voices", "conditioning_latents",
           "scan_voices_dir", "latents_from_checkpoints"]
