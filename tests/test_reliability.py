"""Bad input and faults, replayed: damaged, truncated, mis-typed or self-contradicting model files, damaged
checkpoints, conversions that would destroy their input or are killed half way, and objects used after close.
Each case must end in one clear exception (its exact type, and a message naming the file, key and problem), never
in a crash, a silently wrong result, or lost work.

The modified model files are rewritten from the small_gguf fixture with gguf-py's GGUFReader and GGUFWriter.
"""
from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import pyggml as pg
from tortoise_ggml.models.config import ConfigError
from tortoise_ggml.weights.model_file import ModelFile, ModelFileClosed

gguf = pytest.importorskip("gguf")

DROP = object()


# ------------------------------------------------------------------------------------------------------------------
# rewriting a model file
# ------------------------------------------------------------------------------------------------------------------
def rewrite(src, dst, kv=None, tensors=None, drop_tensors=()):
    """Copy GGUF ``src`` to ``dst`` with metadata values replaced (``kv``: {key: value or DROP}) and tensors replaced
    (``tensors``: {name: numpy array in numpy order}; a float16 array stores the tensor as F16)."""
    kv, tensors = kv or {}, tensors or {}
    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = kv.get(name, field.contents())
        if value is DROP:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        vtype = field.types[0]
        if name in kv and not isinstance(value, (list, bool)):
            vtype = (gguf.GGUFValueType.STRING if isinstance(value, str) else
                     gguf.GGUFValueType.FLOAT64 if isinstance(value, float) else gguf.GGUFValueType.INT32)
        w.add_key_value(name, value, vtype, sub)
    for name, value in kv.items():
        if name not in r.fields and value is not DROP:
            w.add_key_value(name, value, gguf.GGUFValueType.STRING if isinstance(value, str)
                            else gguf.GGUFValueType.INT32)
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        if t.name in tensors:
            w.add_tensor(t.name, np.ascontiguousarray(tensors[t.name]))
        else:
            qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
            data = np.array(t.data)   # numpy order; quantized: rows of bytes, which is what add_tensor takes
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                w.add_tensor(t.name, data.reshape([int(x) for x in reversed(t.shape)]))
            else:
                w.add_tensor(t.name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def tensor(path, name):
    r = gguf.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == name)
    return np.array(t.data).reshape([int(x) for x in reversed(t.shape)])


# ------------------------------------------------------------------------------------------------------------------
# model files: mis-typed, mis-shaped, self-contradicting
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,component", [
    ("ar.gpt.h.0.ln_1.weight", "autoregressive"),        # a norm
    ("ar.gpt.h.0.attn.c_attn.bias", "autoregressive"),   # a bias
    ("clvp.temperature", "clvp"),                        # a scalar the graph adds
    ("voc.conv_pre.bias", "vocoder"),
])
def test_f16_norm_bias_or_scalar_is_refused_at_load(small_gguf, tmp_path, backend, name, component):
    """Used to load fine, then abort the process in ggml's add/mul (F32 with F16)."""
    bad = rewrite(small_gguf, tmp_path / "f16.gguf", tensors={name: tensor(small_gguf, name).astype(np.float16)})
    with pytest.raises(ValueError, match=rf"f16.gguf: {component} tensor '{name}' .* stored as f16, expected f32"):
        ModelFile(bad, backend, components=[component])


def test_wrong_shaped_weight_is_refused_at_load(small_gguf, tmp_path, backend):
    """Used to pass the loader and fail deep in graph building."""
    name = "ar.gpt.h.1.mlp.c_fc.weight"
    w = tensor(small_gguf, name)
    bad = rewrite(small_gguf, tmp_path / "shape.gguf", tensors={name: w[:, :-8].copy()})
    with pytest.raises(ValueError, match=rf"shape.gguf: autoregressive tensor '{name}' \(key 'gpt.h.1.mlp.c_fc.weight'"
                                         rf"\) has shape \({w.shape[0]}, {w.shape[1] - 8}\), .* stores it as "
                                         rf"\({w.shape[0]}, {w.shape[1]}\)"):
        ModelFile(bad, backend, components=["autoregressive"])


def test_metadata_that_contradicts_the_tensors(small_gguf, tmp_path, backend):
    """layers=1 on a 2-layer file used to run (ignoring layer 1)."""
    bad = rewrite(small_gguf, tmp_path / "layers.gguf", kv={"tortoise.autoregressive.layers": 1})
    with pytest.raises(ValueError, match=r"layers.gguf: autoregressive holds key 'gpt\.h\.1\..*' \(and \d+ more\), "
                                         r"which is not part of the autoregressive model its metadata describes "
                                         r"\(.*layers=1.*\): metadata and tensors disagree"):
        ModelFile(bad, backend, components=["autoregressive"])
    more = rewrite(small_gguf, tmp_path / "layers3.gguf", kv={"tortoise.autoregressive.layers": 3})
    with pytest.raises(ValueError, match=r"layers3.gguf: autoregressive has no key 'gpt\.h\.2\..*, which the "
                                         r"autoregressive model its metadata describes .* needs"):
        ModelFile(more, backend, components=["autoregressive"])
    dim = rewrite(small_gguf, tmp_path / "dim.gguf", kv={"tortoise.clvp.dim_text": 96})
    with pytest.raises(ValueError, match=r"dim.gguf: clvp tensor 'clvp.text_emb.weight' .* has shape"):
        ModelFile(dim, backend, components=["clvp"])


@pytest.mark.parametrize("key,value,problem", [
    ("tortoise.autoregressive.mel_length_compression", 0, "is 0, expected a positive integer"),
    ("tortoise.autoregressive.layer_norm_epsilon", -1e-5, "expected a number >= 0"),
    ("tortoise.autoregressive.heads", 3, r"is not a multiple of heads \(3\)"),
    ("tortoise.autoregressive.layers", 10 ** 9, "cannot describe the"),
    ("tortoise.autoregressive.model_dim", "wide", "expected an integer"),
])
def test_metadata_values_out_of_range(small_gguf, tmp_path, backend, key, value, problem):
    """mel_length_compression=0 used to run (and divide by zero downstream); a negative epsilon aborted in ggml."""
    bad = rewrite(small_gguf, tmp_path / "meta.gguf", kv={key: value})
    with pytest.raises(ConfigError, match=rf"meta.gguf: metadata tortoise[.]autoregressive[.].*{problem}"):
        ModelFile(bad, backend, components=["autoregressive"])


def test_file_type_and_component_list(small_gguf, tmp_path, backend):
    bad = rewrite(small_gguf, tmp_path / "type.gguf", kv={"tortoise.type": "q4_k"})
    with pytest.raises(ValueError, match="type.gguf: metadata tortoise.type is 'q4_k', expected one of f32, f16, q8_0"):
        ModelFile(bad, backend, components=["rlg_auto"])
    r = gguf.GGUFReader(str(small_gguf))
    comps = list(r.fields["tortoise.components"].contents())
    bad = rewrite(small_gguf, tmp_path / "comp.gguf", kv={"tortoise.components": comps + ["bark"]})
    with pytest.raises(ValueError, match="comp.gguf: metadata tortoise.components names 'bark', which this "
                                         "tortoise-ggml does not know"):
        ModelFile(bad, backend)


def test_missing_tensor(small_gguf, tmp_path, backend):
    bad = rewrite(small_gguf, tmp_path / "gone.gguf", drop_tensors=("rlg_ar.layers.2.weight",))
    with pytest.raises(ValueError, match="gone.gguf: rlg_auto key 'layers.2.weight' has no tensor "
                                         "'rlg_ar.layers.2.weight'"):
        ModelFile(bad, backend, components=["rlg_auto"])


def test_f32_matrix_in_a_q8_0_file_is_accepted(small_gguf, small_gguf_q8, tmp_path, backend):
    """The one type substitution allowed: any model reads an F32 matrix where f16/q8_0 was planned."""
    r = gguf.GGUFReader(str(small_gguf_q8))
    name = next(t.name for t in r.tensors if t.name.startswith("rlg_ar.") and int(t.tensor_type) == 8)
    with ModelFile(small_gguf, backend, components=["rlg_auto"]) as ref:
        key = name[len("rlg_ar."):]
        w = ref.weights("rlg_auto")[key].get()
    ok = rewrite(small_gguf_q8, tmp_path / "mixed.gguf", tensors={name: w})
    with ModelFile(ok, backend, components=["rlg_auto"]) as mf:
        assert mf.weights("rlg_auto")[key].type == pg.Type.F32


# ------------------------------------------------------------------------------------------------------------------
# damaged files
# ------------------------------------------------------------------------------------------------------------------
def test_corrupted_metadata_string(small_gguf, tmp_path, backend):
    """gguf's reader raises a bare UnicodeDecodeError for it."""
    data = bytearray(open(small_gguf, "rb").read())
    at = data.find(b"rlg_auto.pth")
    assert at > 0
    data[at + 3] = 0xFF
    bad = tmp_path / "utf8.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"utf8.gguf: metadata 'tortoise.rlg_auto.file' is not valid UTF-8 text"):
        ModelFile(bad, backend)


@pytest.mark.parametrize("cut", [0.999, 0.7, 0.05])
def test_truncated_file(small_gguf, tmp_path, backend, cut):
    data = open(small_gguf, "rb").read()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(ValueError, match=r"cut.gguf: (not a readable GGUF file|tensor .* runs past the end)"):
        ModelFile(bad, backend)


def test_random_bit_flips_never_crash(small_gguf, tmp_path):
    """Single corrupted bytes anywhere in the header: each load is clean, or a ValueError (ConfigError) names the
    file. Run in a child process so that a crash fails the test instead of killing pytest."""
    code = f"""
import os, sys, numpy as np, pyggml as pg
from tortoise_ggml.weights.model_file import ModelFile
src = open({str(small_gguf)!r}, "rb").read()
rng = np.random.default_rng(0)
be = pg.Backend("cpu", threads=1)
header = 200_000 if len(src) > 200_000 else len(src)
outcomes = {{}}
for i in range(40):
    data = bytearray(src)
    at = int(rng.integers(8, header))
    data[at] ^= 1 << int(rng.integers(8))
    path = os.path.join({str(tmp_path)!r}, "flip.gguf")
    open(path, "wb").write(bytes(data))
    try:
        ModelFile(path, be, components=["rlg_auto", "clvp"]).close()
        kind = "ok"
    except (ValueError, KeyError, pg.GGMLError) as e:
        kind = type(e).__name__
        assert "flip.gguf" in str(e), (at, repr(e))
    outcomes[kind] = outcomes.get(kind, 0) + 1
print(outcomes)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------------------
# use after close
# ------------------------------------------------------------------------------------------------------------------
def test_weights_after_the_model_file_is_closed(small_gguf, backend):
    with ModelFile(small_gguf, backend, components=["rlg_auto"]) as mf:
        w = mf.weights("rlg_auto")
        t = w["layers.0.weight"]
        t.get()
    with pytest.raises(pg.ClosedError, match="tortoise-small-f32.gguf was closed"):
        t.get()
    with pytest.raises(pg.ClosedError, match="was closed"):
        pg.Context().add(t, t)
    with pytest.raises(ModelFileClosed, match="was closed"):
        w["layers.0.weight"]
    with pytest.raises(ModelFileClosed, match="was closed"):
        mf.weights("rlg_auto")
    with pytest.raises(pg.ClosedError):
        mf.mel_norms


def test_text_to_speech_after_its_model_file_is_closed(small_gguf):
    from tortoise_ggml.api import TextToSpeech
    tts = TextToSpeech(small_gguf, threads=1, components=["rlg_auto", "rlg_diffuser"])
    before = tts.get_random_conditioning_latents(seed=0)   # the cached graphs exist now
    tts.model_file.close()
    with pytest.raises(pg.ClosedError, match="was closed"):
        tts.get_random_conditioning_latents(seed=0)
    assert before[0].shape[0] == 1


def test_context_and_backend_after_close():
    be = pg.Backend("cpu", threads=1)
    ctx = pg.Context()
    x = ctx.new_tensor("f32", (4,)).set_input()
    g = pg.Graph(ctx, ctx.scale(x, 2.0))
    be.close()
    with pytest.raises(pg.ClosedError, match="Backend was closed"):
        be.compute(g, {x: np.ones(4, np.float32)})
    ctx.close()
    for use in (lambda: x.ne, lambda: ctx.scale(x, 2.0), lambda: x.get(), lambda: g.nodes(),
                lambda: ctx.new_tensor("f32", (1,))):
        with pytest.raises(pg.ClosedError, match="Context was closed"):
            use()


def test_buffer_freed_under_its_tensors(backend):
    wctx = pg.Context()
    w = wctx.new_tensor("f32", (4,))
    buf = backend.alloc_tensors(wctx)
    w.set(np.ones(4, np.float32))
    ctx = pg.Context()
    x = ctx.new_tensor("f32", (4,)).set_input()
    g = pg.Graph(ctx, ctx.add(x, w))
    backend.compute(g, {x: np.ones(4, np.float32)})
    del buf   # dropping the Buffer frees the weights' memory
    with pytest.raises(pg.ClosedError, match="buffer was freed"):
        w.get()
    with pytest.raises(pg.ClosedError, match="memory is gone"):
        backend.compute(g, {x: np.ones(4, np.float32)})


# ------------------------------------------------------------------------------------------------------------------
# pyggml: what the model files above used to trigger, and the rest of the class
# ------------------------------------------------------------------------------------------------------------------
def test_mixed_type_arithmetic_is_refused():
    ctx = pg.Context()
    f32, f16, i32 = (ctx.new_tensor(t, (8, 2)) for t in ("f32", "f16", "i32"))
    for a, b in ((f32, f16), (f32, i32), (i32, i32)):
        for op in (ctx.add, ctx.sub, ctx.mul, ctx.div):
            with pytest.raises(pg.ShapeError, match="cannot combine"):
                op(a, b)
    ctx.add(f16, f32)   # what the CPU kernels implement: accepted


@pytest.mark.parametrize("op", ["norm", "rms_norm", "l2_norm"])
@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
def test_bad_epsilon(op, eps):
    ctx = pg.Context()
    with pytest.raises(pg.ShapeError, match=f"{op}: eps (must be|is NaN)"):
        getattr(ctx, op)(ctx.new_tensor("f32", (8,)), eps)


def test_sizes_memory_and_empty_tensors(backend):
    with pytest.raises(pg.OutOfMemory, match="cannot be allocated|could not allocate"):
        pg.Context(mem_size=1 << 60)
    ctx = pg.Context()
    with pytest.raises(pg.ShapeError, match="too large|out of range"):
        ctx.new_tensor("f32", (1 << 40, 1 << 30))
    empty = ctx.new_tensor("f32", (0, 3))
    with pytest.raises(pg.ShapeError, match="empty"):
        empty.set_input()
    with pytest.raises(pg.ShapeError, match="empty"):
        ctx.scale(empty, 2.0)


def test_ids_out_of_range_and_missing_inputs(backend):
    ctx = pg.Context()
    table = ctx.new_tensor("f32", (4, 3)).set_input()
    ids = ctx.new_tensor("i32", (2,)).set_input()
    g = pg.Graph(ctx, ctx.get_rows(table, ids))
    rows = np.ones((3, 4), np.float32)
    for bad in ([0, 3], [-1, 0]):
        with pytest.raises(pg.InputError, match=r"get_rows: ids must lie in \[0, 3\)"):
            backend.compute(g, {table: rows, ids: np.array(bad, np.int32)})
    with pytest.raises(pg.InputError, match="were not given"):
        backend.compute(g, {table: rows})
    backend.compute(g, {table: rows, ids: np.array([2, 0], np.int32)})


def test_cached_graphs_feed_every_input(backend):
    """pyggml.Inputs/CachedGraph (and the AR decode step) give every input on every compute: still accepted."""
    graphs = pg.CachedGraph(backend)

    def build(ctx, inputs):
        x = inputs.add(np.zeros((2, 4), np.float32))
        table = inputs.table("t", lambda: np.arange(4, dtype=np.float32))
        return {"x": x}, ctx.add(x, table)

    for i in range(3):
        out, = graphs.compute("k", build, x=np.full((2, 4), i, np.float32))
        np.testing.assert_array_equal(out.get(), np.broadcast_to(i + np.arange(4, dtype=np.float32), (2, 4)))


# ------------------------------------------------------------------------------------------------------------------
# the converter
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def ckpt_copy(small_ckpt_dir, tmp_path):
    """A private copy of the small checkpoints (these tests damage it)."""
    out = tmp_path / "ckpt"
    shutil.copytree(small_ckpt_dir, out)
    return out


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("target", ["autoregressive.pth", "rlg_auto.pth", "config.json", "."])
def test_convert_refuses_to_overwrite_its_input(ckpt_copy, target):
    from tortoise_ggml.weights.convert import ConvertError, convert
    out = ckpt_copy / target
    before = {p.name: digest(p) for p in ckpt_copy.iterdir()}
    with pytest.raises(ConvertError, match="output (would overwrite the conversion's input|is a directory)"):
        convert(ckpt_copy, out, components="rlg_auto")
    assert {p.name: digest(p) for p in ckpt_copy.iterdir()} == before


def test_convert_refuses_non_finite_weights(ckpt_copy, tmp_path):
    import torch

    from tortoise_ggml.weights.convert import ConvertError, convert
    sd = torch.load(ckpt_copy / "rlg_auto.pth", weights_only=True)
    key = "layers.1.weight"
    sd[key][0, 3] = float("nan")
    torch.save(sd, ckpt_copy / "rlg_auto.pth")
    out = tmp_path / "nan.gguf"
    with pytest.raises(ConvertError, match=r"rlg_auto.pth: key 'layers.1.weight' holds 1 NaN or infinite value"):
        convert(ckpt_copy, out, components="rlg_auto")
    assert not out.exists() and not (tmp_path / "nan.gguf.part").exists()
    sd[key][0, 3] = 1e6
    torch.save(sd, ckpt_copy / "rlg_auto.pth")
    with pytest.raises(ConvertError, match=r"key 'layers.1.weight' holds values up to 1e\+06, beyond what f16 stores"):
        convert(ckpt_copy, out, type="f16", components="rlg_auto")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_signal_during_convert_leaves_no_part_file(small_ckpt_dir, tmp_path, sig):
    """SIGTERM/SIGHUP used to leave OUT.gguf.part behind (Ctrl-C did not). Signals are sent repeatedly from the
    moment the .part appears until the process exits: cleanup must survive the repeats too."""
    out = tmp_path / "out.gguf"
    part = tmp_path / "out.gguf.part"
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "tortoise_ggml.convert", str(small_ckpt_dir), "-o", str(out),
                                 "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while not part.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        if proc.poll() is not None:   # finished before we saw the .part: try again
            out.unlink(missing_ok=True)
            continue
        while proc.poll() is None:
            proc.send_signal(getattr(signal, sig))
            time.sleep(0.01)
        stderr = proc.stderr.read()
        assert proc.returncode != 0, stderr
        assert not part.exists(), f"{part} left behind (exit {proc.returncode}): {stderr[-2000:]}"
        assert not out.exists()
        return
    pytest.skip("the conversion finished before the .part file could be seen")


# ------------------------------------------------------------------------------------------------------------------
# atomic writes (wavs, latents, read's manifest)
# ------------------------------------------------------------------------------------------------------------------
def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    import os

    from tortoise_ggml.api import write_wav
    from tortoise_ggml.utils.files import atomic_path
    out = tmp_path / "a.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(out) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with atomic_path(out) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
    assert out.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask      # as open() makes it, not mkstemp's 0600
    # a clip soundfile refuses half way (a sample rate of 0) fails without touching the file that was there
    wav = tmp_path / "b.wav"
    wav.write_bytes(b"keep")
    with pytest.raises(Exception):
        write_wav(wav, np.zeros(100, np.float32), sample_rate=0)
    assert wav.read_bytes() == b"keep" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.wav"]
