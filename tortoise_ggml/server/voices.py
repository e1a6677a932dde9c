"""Voices: "random", the model file's stored voices, uploaded voices (in memory) and --voices-dir folders.

A name is looked up in that order. A name that is not an exact uploaded or stored name must match
``^[A-Za-z0-9_-][A-Za-z0-9_.-]*$`` (no '/', '\\', '..', no absolute paths) before it is joined to --voices-dir, so
it can never reach outside that folder. Folder voices are computed on first use (their clips at 22.05 kHz through
tts.get_conditioning_latents, with a fixed crop seed) and cached until a clip changes.
"""
from __future__ import annotations

import os
import re
import threading

from .errors import ApiError, bad_request

VOICE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
MAX_NAME_LENGTH = 64
CLIP_EXTS = (".wav", ".mp3", ".flac")
RANDOM = "random"
# the latents of a folder voice do not depend on the request: clips longer than 6 s are cropped with this seed
FOLDER_SEED = 0


def _valid(name: str) -> bool:
    return (0 < len(name) <= MAX_NAME_LENGTH and ".." not in name and "/" not in name and "\\" not in name
            and not os.path.isabs(name) and VOICE_NAME.match(name) is not None)


def check_voice_name(name: str, param: str = "voice") -> str:
    if not isinstance(name, str) or not name:
        raise bad_request("the voice name is empty", param=param, code="invalid_voice")
    if not _valid(name):
        raise bad_request(f"invalid voice name {name[:80]!r}: use at most {MAX_NAME_LENGTH} letters, digits, '_', "
                          "'-' and '.' (not first, no '..')", param=param, code="invalid_voice")
    return name


class VoiceStore:
    def __init__(self, model_voices, voices_dir: str | None = None, max_uploaded: int = 256):
        self.model_voices = list(model_voices)
        self.voices_dir = os.path.abspath(voices_dir) if voices_dir else None
        self.max_uploaded = max_uploaded
        self._lock = threading.Lock()
        self._uploaded: dict[str, tuple] = {}
        self._folder_cache: dict[str, tuple] = {}     # name -> (clips key, latents)
        self._model_cache: dict[str, tuple] = {}

    # -- lookups (event loop) ----------------------------------------------------------------------------------
    def folder_clips(self, name: str) -> list[str]:
        """The clips of voices-dir/NAME (empty when there is no such voice). ``name`` must have been checked."""
        if self.voices_dir is None:
            return []
        folder = os.path.normpath(os.path.join(self.voices_dir, name))
        if os.path.dirname(folder) != os.path.normpath(self.voices_dir) or not os.path.isdir(folder):
            return []
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return []
        return [e.path for e in entries if e.name.lower().endswith(CLIP_EXTS) and e.is_file()]

    def source(self, name: str | None) -> str:
        """Where voice ``name`` comes from: random, uploaded, model_file or voices_dir; ApiError 400/404."""
        if name is None or name == RANDOM:
            return RANDOM
        if not isinstance(name, str):
            raise bad_request("voice must be a string", param="voice", code="invalid_voice")
        with self._lock:
            if name in self._uploaded:
                return "uploaded"
        if name in self.model_voices:       # a --voices-dir folder of the same name wins, as in the CLI
            return "voices_dir" if _valid(name) and self.folder_clips(name) else "model_file"
        check_voice_name(name)
        if self.folder_clips(name):
            return "voices_dir"
        available = [v["id"] for v in self.list()]
        shown = ", ".join(available[:50]) + (f", ... ({len(available)} in all)" if len(available) > 50 else "")
        raise ApiError(404, f"voice {name!r} not found; available voices: {shown}", param="voice",
                       code="voice_not_found")

    def list(self) -> list[dict]:
        out = [{"id": RANDOM, "object": "voice", "source": "random"}]
        out += [{"id": v, "object": "voice", "source": self.source(v)} for v in self.model_voices]
        seen = {RANDOM, *self.model_voices}
        with self._lock:
            uploaded = list(self._uploaded)
        for v in uploaded:
            if v not in seen:
                out.append({"id": v, "object": "voice", "source": "uploaded"})
                seen.add(v)
        if self.voices_dir is not None:
            try:
                names = sorted(e.name for e in os.scandir(self.voices_dir) if e.is_dir())
            except OSError:
                names = []
            for v in names:
                if v not in seen and _valid(v) and self.folder_clips(v):
                    out.append({"id": v, "object": "voice", "source": "voices_dir"})
        return out

    def check_upload_name(self, name: str) -> str:
        check_voice_name(name, param="name")
        if name == RANDOM or name in self.model_voices or self.folder_clips(name):
            raise bad_request(f"voice name {name!r} is taken by a built-in voice: choose another", param="name",
                              code="voice_exists")
        with self._lock:
            if name not in self._uploaded and len(self._uploaded) >= self.max_uploaded:
                raise bad_request(f"at most {self.max_uploaded} uploaded voices: delete one first", param="name",
                                  code="too_many_voices")
        return name

    def delete_uploaded(self, name: str) -> bool:
        with self._lock:
            return self._uploaded.pop(name, None) is not None

    # -- latents (worker thread: these call the TextToSpeech) --------------------------------------------------
    def add_uploaded(self, name: str, latents: tuple) -> None:
        with self._lock:
            self._uploaded[name] = latents

    def latents(self, tts, name: str | None, rng):
        """(autoregressive, diffusion) conditioning latents for voice ``name``; ``rng`` draws a random voice."""
        source = self.source(name)
        if source == RANDOM:
            return tts.get_random_conditioning_latents(seed=rng)
        if source == "uploaded":
            with self._lock:
                return self._uploaded[name]
        if source == "model_file":
            if name not in self._model_cache:
                v = tts.model_file.voice(name)
                self._model_cache[name] = (v["autoregressive"], v.get("diffusion"))
            return self._model_cache[name]
        clips = self.folder_clips(name)
        key = tuple((c, os.stat(c).st_mtime_ns, os.stat(c).st_size) for c in clips)
        cached = self._folder_cache.get(name)
        if cached is None or cached[0] != key:
            latents = conditioning_latents(tts, clips, FOLDER_SEED)
            self._folder_cache[name] = cached = (key, latents)
        return cached[1]


def conditioning_latents(tts, paths, seed, names=None):
    """tts.get_conditioning_latents on audio files (read at 22.05 kHz); ValueError names a clip it cannot read
    (``names``: what to call each file in that message, default its file name)."""
    from ..api import AR_SAMPLE_RATE
    from ..utils.audio import load_audio
    clips = []
    for i, p in enumerate(paths):
        try:
            clips.append(load_audio(p, AR_SAMPLE_RATE)[0])
        except Exception as e:  # noqa: BLE001 - libsndfile/mp3 decoder errors have many types
            name = names[i] if names else os.path.basename(p)
            detail = str(e).replace(os.fspath(p), name)    # not the server's temporary path
            raise ValueError(f"cannot read audio clip {name!r}: {type(e).__name__}: {detail}") from e
    return tts.get_conditioning_latents(clips, seed=seed)
