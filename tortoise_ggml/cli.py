"""What every command line shares: output checks made before any synthesis, and one `error:` line with exit code 2
for every error a user can cause (never a traceback)."""
from __future__ import annotations

import os
import sys

from .models.config import ConfigError
from .weights.checkpoints import CheckpointError


class UsageError(Exception):
    """A bad argument or file; the message says which and why."""


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause: bad arguments, files, model files or devices. Anything else is a bug and keeps its
    traceback. (A function: pyggml and the API load only once a command needs them.)"""
    import pyggml as pg

    from .api import MissingComponent
    return (UsageError, OSError, ValueError, TypeError, KeyError, IndexError, CheckpointError, ConfigError,
            MissingComponent, pg.BackendUnavailable, pg.ShapeError)


def audio_formats() -> dict[str, str]:
    """File extensions soundfile writes, by extension: {'.wav': 'WAV', '.flac': 'FLAC', ...}."""
    import soundfile
    return {f".{name.lower()}": name for name in soundfile.available_formats()}


def check_output(path: str, allow_stdout: bool = False) -> str:
    """``path`` is somewhere an audio file can be written: a known extension, not a directory, in an existing folder
    this process may write to. Checked before the work that would be lost."""
    if allow_stdout and path == "-":
        return path
    if not path:
        raise UsageError("the output path is empty")
    if os.path.isdir(path):
        raise UsageError(f"output {path!r} is a directory: give a file name such as {os.path.join(path, 'out.wav')}")
    ext = os.path.splitext(path)[1].lower()
    formats = audio_formats()
    if ext not in formats:
        raise UsageError(f"output {path!r}: unknown audio format {ext or '(no extension)'!r}; use one of "
                         f"{', '.join(sorted(e for e in formats if e in ('.wav', '.flac', '.ogg', '.mp3')))}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"cannot write {path!r}: permission denied")
    return path


def add_generation_options(ap) -> None:
    """The sampling overrides generate and read share (None: the preset's value; 0 is a value, and an error)."""
    ap.add_argument("--num-autoregressive-samples", type=int, default=None, help="override the preset")
    ap.add_argument("--diffusion-iterations", "--steps", type=int, default=None, dest="diffusion_iterations",
                    help="diffusion steps (override the preset)")
    ap.add_argument("--max-mel-tokens", type=int, default=None, help="longest code sequence (default 500)")
    ap.add_argument("--mel-positions", default="fixed", choices=["fixed", "original"],
                    help="AR mel position scheme (original reproduces tortoise's KV-cache offset)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


GENERATION_OPTIONS = ("num_autoregressive_samples", "diffusion_iterations", "max_mel_tokens")


def generation_overrides(args) -> dict:
    """The add_generation_options overrides given on the command line, for tts()/tts_with_preset()."""
    return {name: getattr(args, name) for name in GENERATION_OPTIONS if getattr(args, name) is not None}


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def describe(e: BaseException) -> str:
    """One line for an error: OSErrors by file and reason, KeyErrors without repr quotes."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e) or type(e).__name__


__all__ = ["UsageError", "user_errors", "add_generation_options", "generation_overrides", "audio_formats",
           "check_output", "fail", "describe"]
