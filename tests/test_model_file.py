"""ModelFile: a converted GGUF mapped into one backend buffer, read back and checked against the checkpoints."""
import os

import numpy as np
import pytest

import pyggml as pg
from tortoise_ggml.weights import names, registry
from tortoise_ggml.weights.model_file import ModelFile

gguf = pytest.importorskip("gguf")


def ne_shape(t):
    """numpy shape of a pyggml tensor with all 4 ggml dims, so trailing unit dims (1, 16, 7) are compared too."""
    return tuple(reversed(t.ne))


def padded(arr):
    arr = np.asarray(arr)
    return arr.reshape((1,) * (4 - arr.ndim) + arr.shape) if arr.ndim else arr.reshape(1, 1, 1, 1)


def test_every_tensor_reads_back_from_the_cpu_backend(oracle, small_ckpt_dir, small_gguf, backend):
    from test_convert import reference_state_dict
    with ModelFile(small_gguf, backend) as mf:
        assert mf.components == list(registry.COMPONENTS)
        total = 0
        for c in registry.COMPONENTS:
            ref = reference_state_dict(oracle, c, small_ckpt_dir)
            w = mf.weights(c)
            assert sorted(w) == sorted(ref)
            for k, want in ref.items():
                t = w[k]
                assert t.type == pg.Type.F32 and t.name == names.tensor_name(c, k)
                want = padded(want)
                assert ne_shape(t) == want.shape, (c, k)
                np.testing.assert_array_equal(t.get().reshape(want.shape), want, err_msg=f"{c} {k}")
                total += t.nbytes
        assert mf.buffer.size >= total and mf.buffer.is_host


def test_hparams_metadata_tokenizer_mel_norms(small_gguf, backend):
    import importlib.util

    import torch
    data = os.path.join(list(importlib.util.find_spec("tortoise").submodule_search_locations)[0], "data")
    with ModelFile(small_gguf, backend, components=["rlg_auto"]) as mf:
        hp = mf.hparams("autoregressive")  # metadata of every component, whatever was loaded
        assert hp["layers"] == 2 and hp["model_dim"] == 128 and hp["heads"] == 4
        assert type(hp["layers"]) is int and hp["train_solo_embeddings"] is False
        assert "keys" not in hp and "file" not in hp
        voc = mf.hparams("vocoder")
        assert voc["strides"] == [8, 8, 4] and voc["lReLU_slope"] == 0.2 and isinstance(voc["lReLU_slope"], float)
        assert mf.metadata["general.architecture"] == "tortoise"
        assert mf.metadata["tortoise.format_version"] == 1
        with open(os.path.join(data, "tokenizer.json"), encoding="utf-8") as f:
            assert mf.tokenizer_json == f.read()
        norms = mf.mel_norms
        assert norms.shape == (80,) and norms.dtype == np.float32
        np.testing.assert_array_equal(norms, torch.load(os.path.join(data, "mel_norms.pth")).numpy())
        assert mf.voices == []


def test_component_subset_and_key_errors(small_gguf, backend):
    with ModelFile(small_gguf, backend) as full:
        full_size = full.buffer.size
    with ModelFile(small_gguf, backend, components=["vocoder", "rlg_auto"]) as mf:
        assert mf.components == ["vocoder", "rlg_auto"]
        assert mf.buffer.size < full_size / 3
        assert mf.weights("vocoder")["conv_pre.weight"].shape == (16, 16, 7)
        with pytest.raises(KeyError, match="vocoder has no weight 'conv_pre.weight_g'"):
            mf.weights("vocoder")["conv_pre.weight_g"]
        with pytest.raises(KeyError, match="'autoregressive' is not loaded"):
            mf.weights("autoregressive")
        with pytest.raises(KeyError, match="holds no 'gpt'"):
            mf.hparams("gpt")
        with pytest.raises(KeyError, match="no voice 'bob'"):
            mf.voice("bob")


def test_file_with_a_component_subset(small_ckpt_dir, tmp_path, backend):
    from tortoise_ggml.convert import convert
    path = convert(small_ckpt_dir, tmp_path / "voc.gguf", components="vocoder")
    with ModelFile(path, backend) as mf:
        assert mf.components == mf.available_components == ["vocoder"]
    with pytest.raises(ValueError, match="voc.gguf: holds no diffusion"):
        ModelFile(path, backend, components=["vocoder", "diffusion"])


def test_q8_0_file_loads_and_multiplies(small_gguf, small_gguf_q8, backend):
    from tortoise_ggml.models import layers
    reader = gguf.GGUFReader(small_gguf_q8)
    raw = {t.name: t for t in reader.tensors}
    with ModelFile(small_gguf_q8, backend, components=["autoregressive"]) as mq, \
            ModelFile(small_gguf, backend, components=["autoregressive"]) as mf:
        wq = mq.weights("autoregressive")["mel_head.weight"]
        w32 = mf.weights("autoregressive")["mel_head.weight"]
        assert wq.type == pg.Type.Q8_0 and wq.ne == w32.ne
        np.testing.assert_array_equal(wq.get(), np.asarray(raw["ar.mel_head.weight"].data).reshape(-1))
        assert mq.weights("autoregressive")["final_norm.weight"].type == pg.Type.F32
        # the loaded q8_0 matrix is usable by ggml and close to the f32 one
        x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
        outs = []
        for w in (wq, w32):
            ctx = pg.Context()
            xt = ctx.new_tensor("f32", (128, 3)).set_input()
            y = layers.linear(ctx, xt, w)
            backend.compute(pg.Graph(ctx, y), {xt: x})
            outs.append(y.get())
        ref = x @ w32.get().T
        np.testing.assert_allclose(outs[1], ref, rtol=1e-4, atol=1e-4)
        rel = np.abs(outs[0] - ref).max() / np.abs(ref).max()
        assert 0 < rel < 0.02


def _has_amx(backend):
    return any(bt.name == "AMX" for bt in backend.extra_buffer_types())


@pytest.mark.skipif(not _has_amx(pg.Backend("cpu", threads=1)), reason="this CPU (or build) has no AMX")
def test_q8_0_matmul_weights_in_the_amx_layout(small_gguf_q8, backend):
    """q8_0 matmul weights go to the AMX layout, embedding tables and odd-sized matrices stay plain; the products
    match the plain layout's (both quantise the activations to q8_0); repacked weights refuse other ops."""
    from tortoise_ggml.models import layers
    with ModelFile(small_gguf_q8, backend, components=["autoregressive"]) as amx, \
            ModelFile(small_gguf_q8, backend, components=["autoregressive"], repack=False) as plain:
        wa, wp = amx.weights("autoregressive"), plain.weights("autoregressive")
        key = "gpt.h.0.mlp.c_fc.weight"
        assert wa[key].matmul_layout == "AMX" and wp[key].matmul_layout is None
        assert amx.matmul_buffer is not None and plain.matmul_buffer is None
        assert wa["mel_embedding.weight"].matmul_layout is None  # gathered by row
        assert wa["mel_head.weight"].matmul_layout is None       # 8194 rows: not a multiple of the 32-row tiles
        assert not any(w.matmul_layout for w in wp.values())
        rng = np.random.default_rng(0)
        d = wa[key].ne[0]
        for rows in (1, 5, 16, 77):  # the VNNI path (one row) and AMX tiles with partial tiles
            x = rng.standard_normal((rows, 2, d)).astype(np.float32)
            outs = []
            for w in (wa[key], wp[key]):
                ctx = pg.Context()
                xt = ctx.new_tensor("f32", (d, 2, rows)).set_input()
                y = layers.linear(ctx, ctx.permute(xt, 0, 2, 1, 3), w)  # a non-contiguous (d, rows, 2) operand
                backend.compute(pg.Graph(ctx, y), {xt: x})
                outs.append(y.get())
            np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5 * np.abs(outs[1]).max())
        with pytest.raises(pg.GGMLError, match="AMX matmul layout"):
            wa[key].get()
        ctx = pg.Context()
        ids = ctx.new_tensor("i32", (3,)).set_input()
        rows = ctx.get_rows(wa[key], ids)
        with pytest.raises(pg.GGMLError, match="cannot compute"):
            backend.compute(pg.Graph(ctx, rows), {ids: np.array([0, 1, 2], np.int32)})


def test_voices_are_readable(small_ckpt_dir, tmp_path, backend):
    import torch

    from tortoise_ggml.convert import convert
    vd = tmp_path / "voices" / "alice"
    vd.mkdir(parents=True)
    lat = (torch.randn(1, 128), torch.randn(1, 256))
    torch.save(lat, vd / "latents.pth")
    path = convert(small_ckpt_dir, tmp_path / "v.gguf", components="rlg_auto", voices_dir=tmp_path / "voices")
    with ModelFile(path, backend) as mf:
        assert mf.voices == ["alice"]
        v = mf.voice("alice")
        np.testing.assert_array_equal(v["autoregressive"], lat[0].numpy())
        np.testing.assert_array_equal(v["diffusion"], lat[1].numpy())


def test_close_and_context_manager(small_gguf, backend):
    mf = ModelFile(small_gguf, backend, components=["rlg_auto"])
    assert mf.buffer is not None
    mf.close()
    assert mf.buffer is None
    with pytest.raises(KeyError):
        mf.weights("rlg_auto")
    mf.close()  # twice is fine


# ------------------------------------------------------------------------------------------------------------------
# bad files
# ------------------------------------------------------------------------------------------------------------------
def write_gguf(path, arch="tortoise", version=1, components=("rlg_auto",)):
    w = gguf.GGUFWriter(str(path), arch)
    if version is not None:
        w.add_uint32(f"{arch}.format_version", version)
    w.add_array(f"{arch}.components", list(components))
    w.add_tensor("mel_norms", np.zeros(80, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_missing_file_and_bad_backend(small_gguf, tmp_path, backend):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        ModelFile(tmp_path / "nothing.gguf", backend)
    with pytest.raises(TypeError, match="pyggml.Backend"):
        ModelFile(small_gguf, "cpu")


def test_corrupt_and_truncated_files(small_gguf, tmp_path, backend):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + os.urandom(100))
    with pytest.raises(ValueError, match="bad.gguf: not a readable GGUF file"):
        ModelFile(bad, backend)
    data = open(small_gguf, "rb").read()
    for cut in (len(data) - 1000, 4000, 30):
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"bad.gguf: (not a readable GGUF file|.*past the end of the file)"):
            ModelFile(bad, backend)


def test_wrong_architecture_and_version(tmp_path, backend):
    with pytest.raises(ValueError, match="general.architecture is 'llama'"):
        ModelFile(write_gguf(tmp_path / "a.gguf", arch="llama"), backend)
    with pytest.raises(ValueError, match="b.gguf: format version 2"):
        ModelFile(write_gguf(tmp_path / "b.gguf", version=2), backend)
    with pytest.raises(ValueError, match="c.gguf: format version None"):
        ModelFile(write_gguf(tmp_path / "c.gguf", version=None), backend)
    with pytest.raises(ValueError, match="d.gguf: no key list for rlg_auto"):
        ModelFile(write_gguf(tmp_path / "d.gguf"), backend)


@pytest.mark.skipif(not pg.cuda_available(), reason="needs a CUDA build and device")
def test_loads_into_cuda(small_gguf, small_gguf_q8):
    be = pg.Backend("cuda")
    for path in (small_gguf, small_gguf_q8):
        with ModelFile(path, be) as mf, ModelFile(path, pg.Backend("cpu", threads=2)) as host:
            assert not mf.buffer.is_host
            for c in mf.components:
                for k, t in mf.weights(c).items():
                    np.testing.assert_array_equal(t.get(), host.weights(c)[k].get(), err_msg=f"{c} {k}")
