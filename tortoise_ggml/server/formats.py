"""Response audio formats (24 kHz mono): which are streamed part by part and which are encoded whole.

- ``pcm``: raw 16-bit little-endian samples, streamed.
- ``wav``: 16-bit PCM WAV, streamed: the header goes out with the first part. When the input is one part the
  header holds the exact sizes; otherwise the RIFF and data sizes are 0xFFFFFFFF, as streaming WAV writers do
  (readers take the data to the end of the stream).
- ``flac``, ``mp3``, ``opus`` (Ogg Opus): encoded by soundfile (libsndfile) once all parts are done, where the
  installed libsndfile can write them. ``aac``: never (libsndfile has no AAC encoder).
"""
from __future__ import annotations

import io

import numpy as np

from ..utils.audio import to_pcm16, wav_header

MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
               "opus": "audio/opus", "aac": "audio/aac"}
STREAMED = ("wav", "pcm")
# soundfile (format, subtype) for the formats encoded whole
_SOUNDFILE = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}


def supported_formats() -> tuple[str, ...]:
    """The response formats this installation can produce."""
    import soundfile
    out = list(STREAMED)
    formats = soundfile.available_formats()
    for name, (fmt, subtype) in _SOUNDFILE.items():
        try:
            if fmt in formats and subtype in soundfile.available_subtypes(fmt):
                out.append(name)
        except Exception:  # noqa: BLE001 - an old libsndfile without the query
            pass
    return tuple(out)


def encode_whole(fmt: str, wav: np.ndarray, sample_rate: int) -> bytes:
    import soundfile
    if fmt == "wav":
        pcm = to_pcm16(wav)
        return wav_header(sample_rate, len(pcm) // 2) + pcm
    if fmt == "pcm":
        return to_pcm16(wav)
    container, subtype = _SOUNDFILE[fmt]
    buf = io.BytesIO()
    soundfile.write(buf, np.clip(np.asarray(wav, np.float32).reshape(-1), -1.0, 1.0), sample_rate,
                    format=container, subtype=subtype)
    return buf.getvalue()
