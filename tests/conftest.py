"""Shared fixtures: small random checkpoints written by tortoise-tts 3.0.0's own classes (tests/reference)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def oracle():
    """tests/reference/oracle.py, imported with the torchaudio stand-in in place (needs torch + tortoise-tts)."""
    pytest.importorskip("torch")
    from reference import oracle as o
    return o


@pytest.fixture(scope="session")
def small_ckpt_dir(oracle, tmp_path_factory):
    """A models dir like the release's, with random weights at the small config (zero-initialised params
    randomised so a dropped block cannot still match)."""
    out = tmp_path_factory.mktemp("ckpt_small")
    oracle.save_all("small", str(out), seed=0)
    return out


@pytest.fixture(scope="session")
def small_gguf(small_ckpt_dir, tmp_path_factory):
    """``small_ckpt_dir`` converted to one f32 GGUF (every component, tokenizer, mel norms)."""
    from tortoise_ggml.convert import convert
    return convert(small_ckpt_dir, tmp_path_factory.mktemp("gguf_small") / "tortoise-small-f32.gguf", type="f32")


@pytest.fixture(scope="session")
def small_gguf_q8(small_ckpt_dir, tmp_path_factory):
    """``small_ckpt_dir`` converted with --type q8_0 (2-D weight matrices q8_0, the rest F32)."""
    from tortoise_ggml.convert import convert
    return convert(small_ckpt_dir, tmp_path_factory.mktemp("gguf_small_q8") / "tortoise-small-q8_0.gguf", type="q8_0")


@pytest.fixture(scope="session")
def backend():
    """The CPU backend most tests compute on (two threads: this machine's cores)."""
    import pyggml as pg
    return pg.Backend("cpu", threads=2)


@pytest.fixture(scope="module")
def reference(request, oracle, small_ckpt_dir):
    """tortoise-tts's own model (small config, the shared random checkpoints) of the component the test module
    names in REFERENCE."""
    return oracle.load(request.module.REFERENCE, "small", ckpt=str(small_ckpt_dir))


@pytest.fixture(scope="module")
def model_file(request, small_gguf, backend):
    """``small_gguf`` loaded into ``backend``: the components the test module lists in COMPONENTS (default all)."""
    from tortoise_ggml.weights.model_file import ModelFile
    with ModelFile(small_gguf, backend, components=getattr(request.module, "COMPONENTS", None)) as mf:
        yield mf
