"""torchaudio stand-in for the reference (see reference/shim/__init__.py).

No CPU torchaudio wheel matches torch 2.13.0+cpu, and the CUDA wheel's C extension cannot load here.
tortoise-tts only needs torchaudio's pure-Python mel spectrogram and resample code, so this module
loads those two source files straight from the unpacked torchaudio 2.11.0 wheel
($TORTOISE_GGML_TORCHAUDIO_SRC, set by reference.shim.install) with the C extension stubbed out. load/save/info raise.
"""
import importlib.util
import os
import sys
import types

_ROOT = os.path.join(os.environ["TORTOISE_GGML_TORCHAUDIO_SRC"], "torchaudio")
__path__ = [os.path.dirname(__file__)]
__version__ = "2.11.0+oracle"


def _stub(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def _load(name, rel):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


_stub("torchaudio._extension", _IS_TORCHAUDIO_EXT_AVAILABLE=False)
functional = _stub("torchaudio.functional", __path__=[os.path.join(_ROOT, "functional")])
_stub("torchaudio.functional.filtering", highpass_biquad=None, treble_biquad=None)
_real_f = _load("torchaudio.functional.functional", "functional/functional.py")
for _k in dir(_real_f):
    if not _k.startswith("__"):
        setattr(functional, _k, getattr(_real_f, _k))
transforms = _stub("torchaudio.transforms", __path__=[os.path.join(_ROOT, "transforms")])
_real_t = _load("torchaudio.transforms._transforms", "transforms/_transforms.py")
for _k in ("MelSpectrogram", "Spectrogram", "MelScale"):
    setattr(transforms, _k, getattr(_real_t, _k))


def _unavailable(name):
    def f(*a, **k):
        raise NotImplementedError(f"torchaudio.{name} is not in the oracle stand-in")
    return f


load, save, info = _unavailable("load"), _unavailable("save"), _unavailable("info")
