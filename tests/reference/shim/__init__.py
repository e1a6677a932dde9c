"""A torchaudio stand-in for the reference: tortoise imports torchaudio at module level, and no CPU torchaudio wheel
matches torch 2.13.0. Tortoise only needs torchaudio's pure-Python MelSpectrogram and resample, so the stand-in
loads those source files from the real torchaudio 2.11.0 wheel (fetched once with pip into the user cache), with
the C extension stubbed out. Our numpy front-end is thus compared with torchaudio's own code, not a re-write.
"""
import glob
import os
import subprocess
import sys
import zipfile

TORCHAUDIO = "torchaudio==2.11.0"
HERE = os.path.dirname(os.path.abspath(__file__))


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = os.path.join(base, "tortoise-ggml")
    os.makedirs(d, exist_ok=True)
    return d


def torchaudio_source() -> str:
    """Directory holding the unpacked torchaudio package (downloaded on first use)."""
    root = os.environ.get("TORTOISE_GGML_TORCHAUDIO_SRC") or os.path.join(cache_dir(), "torchaudio-2.11.0")
    if not os.path.isfile(os.path.join(root, "torchaudio", "transforms", "_transforms.py")):
        dl = os.path.join(cache_dir(), "wheels")
        wheels = glob.glob(os.path.join(dl, "torchaudio-2.11.0-*.whl"))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", dl, TORCHAUDIO],
                           check=True)
            wheels = glob.glob(os.path.join(dl, "torchaudio-2.11.0-*.whl"))
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(root, [n for n in z.namelist() if n.startswith("torchaudio/") and n.endswith(".py")])
    return root


def install() -> None:
    """Make ``import torchaudio`` give the stand-in."""
    os.environ["TORTOISE_GGML_TORCHAUDIO_SRC"] = torchaudio_source()
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
