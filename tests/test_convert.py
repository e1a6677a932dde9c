"""The converter: checkpoints -> GGUF, checked tensor by tensor against tortoise-tts 3.0.0's own loading."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from tortoise_ggml.convert import ConvertError, convert  # noqa: E402
from tortoise_ggml.weights import checkpoints, names, registry  # noqa: E402
from tortoise_ggml.weights.checkpoints import CheckpointError  # noqa: E402


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
def reference_state_dict(oracle, component, ckpt_dir):
    """The weights the reference actually computes with: loaded the api.py way (vocoder weight norm removed by
    UnivNet's own remove_weight_norm), with GPT-2 Conv1D weights transposed to (out, in) as the file stores them."""
    m = oracle.load(component, "small", str(ckpt_dir))
    sd = {k: v.detach().float().numpy() for k, v in m.state_dict().items()
          if not k.startswith(("inference_model.", "gpt.wte."))}  # post_init_gpt2_config's aliases
    for k in sd:
        if registry.REGISTRY["autoregressive"].transposed.match(k):
            sd[k] = sd[k].T
    return sd


def read_gguf(path):
    r = gguf.GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


def as_float(t):
    """A ReaderTensor's values as float32 in numpy order."""
    shape = tuple(int(x) for x in reversed(t.shape))
    if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
        return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
    return np.asarray(t.data, dtype=np.float32).reshape(shape)


def field(reader, key):
    return reader.fields[key].contents()


def copy_dir(src, dst, only=None):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if only is None or f in only or f == "config.json":
            shutil.copy(os.path.join(src, f), dst)
    return dst


def edit_checkpoint(src_dir, dst_dir, component, edit):
    """Copy the component's checkpoint into dst_dir with ``edit(state_dict)`` applied."""
    fname = registry.REGISTRY[component].checkpoint
    copy_dir(src_dir, dst_dir, only={fname})
    obj = torch.load(os.path.join(src_dir, fname))
    sd = obj["model_g"] if component == "vocoder" else obj
    edit(sd)
    torch.save(obj, os.path.join(dst_dir, fname))
    return dst_dir


# ------------------------------------------------------------------------------------------------------------------
# round trip
# ------------------------------------------------------------------------------------------------------------------
def test_f32_round_trip_every_tensor_exact(oracle, small_ckpt_dir, small_gguf):
    reader, tensors = read_gguf(small_gguf)
    assert field(reader, "general.architecture") == "tortoise"
    assert field(reader, "tortoise.format_version") == 1
    assert field(reader, "tortoise.components") == list(registry.COMPONENTS)
    n_model = 0
    for c in registry.COMPONENTS:
        ref = reference_state_dict(oracle, c, small_ckpt_dir)
        keys = field(reader, f"tortoise.{c}.keys")
        assert sorted(keys) == sorted(ref), c  # nothing dropped, nothing extra (legacy GPT-2 buffers gone)
        for k in keys:
            t = tensors[names.tensor_name(c, k)]
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, (c, k)
            want = ref[k].reshape(-1) if ref[k].ndim == 0 else ref[k]
            np.testing.assert_array_equal(as_float(t), want, err_msg=f"{c} {k}")
            n_model += 1
    assert n_model == len(tensors) - 1  # + mel_norms


def test_legacy_gpt2_buffers_present_in_checkpoint_and_dropped(small_ckpt_dir, small_gguf):
    sd = torch.load(os.path.join(small_ckpt_dir, "autoregressive.pth"))
    assert "gpt.h.0.attn.bias" in sd and "gpt.h.0.attn.masked_bias" in sd  # the fixture really has them
    reader, _ = read_gguf(small_gguf)
    keys = field(reader, "tortoise.autoregressive.keys")
    import re
    assert not [k for k in keys if re.fullmatch(r"gpt\.h\.\d+\.attn\.(bias|masked_bias)", k)]
    assert "gpt.h.0.attn.c_attn.bias" in keys


def test_hparams_match_the_constructor_arguments(oracle, small_gguf):
    reader, _ = read_gguf(small_gguf)
    for c in registry.COMPONENTS:
        cfg = oracle.CONFIGS["small"][c]
        for k, v in cfg.items():
            key = f"tortoise.{c}.{k}"
            if key in reader.fields:
                assert field(reader, key) == v, key
    assert field(reader, "tortoise.autoregressive.layers") == 2
    assert field(reader, "tortoise.autoregressive.heads") == 4  # from config.json: the shapes cannot show it
    assert field(reader, "tortoise.vocoder.dilations") == [1, 3]
    assert field(reader, "tortoise.vocoder.strides") == [8, 8, 4]
    assert field(reader, "tortoise.vocoder.lReLU_slope") == 0.2
    assert field(reader, "tortoise.diffusion.num_heads") == 4
    assert field(reader, "tortoise.clvp.text_heads") == 2


def test_tokenizer_and_mel_norms(small_gguf):
    import importlib.util
    data = os.path.join(list(importlib.util.find_spec("tortoise").submodule_search_locations)[0], "data")
    reader, tensors = read_gguf(small_gguf)
    with open(os.path.join(data, "tokenizer.json"), encoding="utf-8") as f:
        assert field(reader, "tortoise.tokenizer.json") == f.read()
    np.testing.assert_array_equal(as_float(tensors["mel_norms"]),
                                  torch.load(os.path.join(data, "mel_norms.pth")).numpy())


def test_models_dir_tokenizer_is_preferred(small_ckpt_dir, tmp_path):
    d = copy_dir(small_ckpt_dir, tmp_path / "m", only={"rlg_auto.pth"})
    text = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})
    (d / "tokenizer.json").write_text(text)
    out = convert(d, tmp_path / "o.gguf", components="rlg_auto")
    assert field(read_gguf(out)[0], "tortoise.tokenizer.json") == text


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_reduced_types_only_on_matrices(small_ckpt_dir, small_gguf, small_gguf_q8, tmp_path, qtype):
    if qtype == "q8_0":
        path = small_gguf_q8
    else:
        path = convert(small_ckpt_dir, tmp_path / "f16.gguf", type="f16", components=["autoregressive", "vocoder"])
    _, exact = read_gguf(small_gguf)
    reader, tensors = read_gguf(path)
    assert field(reader, "tortoise.type") == qtype
    want_type = gguf.GGMLQuantizationType.F16 if qtype == "f16" else gguf.GGMLQuantizationType.Q8_0
    n_reduced = n_flat = 0
    for name, t in tensors.items():
        ref = as_float(exact[name])
        matrix = ref.ndim == 2 and not name.startswith("mel_norms") and "rpb" not in name
        flat_conv = name.startswith("diff.") and ref.ndim == 3 and name.endswith(".weight") and (
            qtype == "f16" or ref.shape[1] * ref.shape[2] % 32 == 0)
        if flat_conv:  # diffusion kernels are stored flattened (out, in*k): matrices like any other
            assert as_float(t).shape == (ref.shape[0], ref.shape[1] * ref.shape[2]), name
            ref = ref.reshape(ref.shape[0], -1)
            matrix, n_flat = True, n_flat + 1
        if not matrix:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(as_float(t), ref, err_msg=name)
            continue
        assert t.tensor_type == want_type, name
        n_reduced += 1
        got = as_float(t)
        if qtype == "f16":
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-6, err_msg=name)
        else:
            # q8_0: per block of 32 along a row, scale d = absmax/127 stored as f16 -> error <= d/2 from rounding
            # to an integer + 127 * d * 2^-11 from the f16 scale
            d = np.abs(ref).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            err = np.abs(got - ref).reshape(-1, 32)
            assert np.all(err <= d * (0.5 + 127 * 2.0 ** -11) + 1e-7), name
    assert n_reduced > 10 and (n_flat > 5 or qtype == "f16")
    # the large matrices are what shrinks the file
    assert os.path.getsize(path) < 0.7 * os.path.getsize(small_gguf) or qtype == "f16"


def test_q8_0_falls_back_to_f16_for_rows_not_multiple_of_32():
    from tortoise_ggml.weights.registry import REGISTRY
    _storage_type = REGISTRY["diffusion"].storage_type
    assert _storage_type("x.weight", (64, 64), "q8_0") == "q8_0"
    assert _storage_type("x.weight", (64, 40), "q8_0") == "f16"
    assert _storage_type("x.weight", (64, 40, 3), "q8_0") == "f32"  # conv kernels stay F32 ...
    assert _storage_type("x.bias", (64,), "f16") == "f32"
    assert _storage_type("a.relative_pos_embeddings.relative_attention_bias.weight", (32, 64), "q8_0") == "f32"
    # ... except the diffusion decoder's, stored flattened where the rows suit the type
    def _stored_shape(key, shape, component, wanted):
        return REGISTRY[component].stored_shape(key, shape, wanted)
    assert _stored_shape("x.weight", (64, 32, 3), "diffusion", "q8_0") == (64, 96)
    assert _stored_shape("x.weight", (64, 100, 3), "diffusion", "q8_0") == (64, 100, 3)   # 300: not q8_0 rows
    assert _stored_shape("x.weight", (64, 100, 3), "diffusion", "f16") == (64, 300)
    assert _stored_shape("x.weight", (64, 40, 3), "diffusion", "f32") == (64, 40, 3)
    assert _stored_shape("x.weight", (64, 40, 3), "vocoder", "q8_0") == (64, 40, 3)


# ------------------------------------------------------------------------------------------------------------------
# key grammar at full size (meta device: no memory, no time) and tensor names
# ------------------------------------------------------------------------------------------------------------------
def meta_state_shapes(oracle, component, size):
    cfg = oracle.CONFIGS[size][component]
    classes = {"autoregressive": oracle.UnifiedVoice, "diffusion": oracle.DiffusionTts, "clvp": oracle.CLVP,
               "cvvp": oracle.CVVP, "vocoder": oracle.UnivNetGenerator,
               "hifigan": oracle.HifiganGenerator}
    with torch.device("meta"):
        m = (classes[component](**cfg) if component in classes
             else oracle.RandomLatentConverter(cfg["channels"]))
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    for base, (g, v) in checkpoints.weight_norm_pairs(shapes, component).items():
        shapes[base] = shapes.pop(v)
        del shapes[g]
    return shapes


@pytest.fixture(scope="module")
def full_shapes(oracle):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {c: meta_state_shapes(oracle, c, "full") for c in registry.COMPONENTS}


def test_full_size_key_tables_and_hparams(oracle, full_shapes):
    """No config.json: every full-size hyperparameter must come out of the shapes / api.py defaults."""
    for c, shapes in full_shapes.items():
        hp, ignored = registry.component(c).validate(shapes, f"full/{c}")
        assert not ignored
        for k, v in oracle.CONFIGS["full"][c].items():
            if k in hp:
                assert hp[k] == v, (c, k)
    assert registry.component("autoregressive").validate(full_shapes["autoregressive"], "x")[0]["heads"] == 16
    voc = registry.component("vocoder").validate(full_shapes["vocoder"], "x")[0]
    assert (voc["noise_dim"], voc["channel_size"], voc["dilations"], voc["strides"]) == (64, 32, [1, 3, 9, 27],
                                                                                        [8, 8, 4])


def test_gathered_keys_are_exactly_the_embedding_tables(oracle):
    """ModelFile keeps GATHERED keys out of repacked matmul layouts: they must be every nn.Embedding's weight (the
    tables models read with get_rows), and nothing else."""
    import warnings
    classes = {"autoregressive": oracle.UnifiedVoice, "diffusion": oracle.DiffusionTts, "clvp": oracle.CLVP,
               "cvvp": oracle.CVVP, "vocoder": oracle.UnivNetGenerator,
               "hifigan": oracle.HifiganGenerator}
    for c in registry.COMPONENTS:
        cfg = oracle.CONFIGS["full"][c]
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            m = classes[c](**cfg) if c in classes else oracle.RandomLatentConverter(cfg["channels"])
        tables = {f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, torch.nn.Embedding)}
        keys = set(m.state_dict())
        assert tables <= keys, c
        assert {k for k in keys if registry.GATHERED.match(k)} == tables, c


def test_tensor_names_fit_and_are_injective_at_full_size(full_shapes):
    all_names = set()
    for c, shapes in full_shapes.items():
        for k in shapes:
            n = names.tensor_name(c, k)
            assert len(n.encode()) <= names.MAX_NAME_BYTES
            assert names.key_from_name(c, n) == k
            all_names.add(n)
    assert len(all_names) == sum(len(s) for s in full_shapes.values())
    assert len(max(all_names, key=len)) > 40  # the abbreviations are doing real work on 94-byte keys


def test_tensor_name_errors():
    with pytest.raises(names.TensorNameError, match="unknown component"):
        names.tensor_name("gpt", "x.weight")
    with pytest.raises(names.TensorNameError, match="63-byte"):
        names.tensor_name("vocoder", "a" * 70)
    with pytest.raises(names.TensorNameError, match="'~'"):
        names.tensor_name("clvp", "a~b")


def test_alias_keys_of_the_inference_model_are_ignored(oracle, small_ckpt_dir, small_gguf, tmp_path):
    """A UnifiedVoice saved after post_init_gpt2_config holds GPT2InferenceModel's copies of its modules."""
    m = oracle.load("autoregressive", "small", str(small_ckpt_dir))
    sd = m.state_dict()
    assert any(k.startswith("inference_model.lm_head.1.") for k in sd)
    d = copy_dir(small_ckpt_dir, tmp_path / "m", only=set())
    torch.save(sd, d / "autoregressive.pth")
    out = convert(d, tmp_path / "o.gguf", components=["autoregressive"])
    _, a = read_gguf(out)
    _, b = read_gguf(small_gguf)
    for name, t in a.items():
        np.testing.assert_array_equal(as_float(t), as_float(b[name]), err_msg=name)
    assert set(a) == {n for n in b if n.startswith("ar.")} | {"mel_norms"}
    # an alias that disagrees with the tensor it duplicates is a broken file, not something to drop silently
    sd["inference_model.lm_head.1.bias"] = sd["inference_model.lm_head.1.bias"] + 1
    torch.save(sd, d / "autoregressive.pth")
    with pytest.raises(CheckpointError, match=r"inference_model\.lm_head\.1\.bias.*mel_head\.bias"):
        convert(d, tmp_path / "o2.gguf", components=["autoregressive"])


# ------------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------------
def test_missing_dir_and_file(small_ckpt_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert(tmp_path / "nowhere", tmp_path / "o.gguf")
    with pytest.raises(FileNotFoundError, match="no_dir: output directory not found"):
        convert(small_ckpt_dir, tmp_path / "no_dir" / "o.gguf")
    d = copy_dir(small_ckpt_dir, tmp_path / "m", only={"rlg_auto.pth"})
    with pytest.raises(FileNotFoundError, match="autoregressive.pth.*diffusion_decoder.pth"):
        convert(d, tmp_path / "o.gguf")
    assert not os.path.exists(tmp_path / "o.gguf")


def test_corrupt_checkpoint(small_ckpt_dir, tmp_path):
    d = copy_dir(small_ckpt_dir, tmp_path / "m", only=set())
    (d / "rlg_auto.pth").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ConvertError, match="rlg_auto.pth: cannot read"):
        convert(d, tmp_path / "o.gguf", components="rlg_auto")
    torch.save([1, 2], d / "rlg_auto.pth")
    with pytest.raises(ConvertError, match="rlg_auto.pth: expected a state dict"):
        convert(d, tmp_path / "o.gguf", components="rlg_auto")


@pytest.mark.parametrize("component, edit, message", [
    ("autoregressive", lambda sd: sd.__setitem__("gpt.h.0.attn.foo.weight", torch.zeros(3)),
     r"autoregressive.pth: unknown key 'gpt\.h\.0\.attn\.foo\.weight'"),
    ("autoregressive", lambda sd: sd.pop("final_norm.bias"), r"autoregressive.pth: missing key 'final_norm\.bias'"),
    ("autoregressive", lambda sd: sd.pop("gpt.h.1.mlp.c_fc.weight"),
     r"missing key 'gpt\.h\.1\.mlp\.c_fc\.weight'"),
    ("autoregressive", lambda sd: sd.__setitem__("gpt.h.1.ln_1.weight", torch.zeros(127)),
     r"key 'gpt\.h\.1\.ln_1\.weight' has shape \(127,\), expected \(128,\)"),
    ("autoregressive", lambda sd: sd.pop("text_embedding.weight"), r"missing key 'text_embedding\.weight'"),
    ("diffusion", lambda sd: sd.__setitem__("layers.0.attn.qkv.weight", torch.zeros(384, 128, 3)),
     r"diffusion_decoder.pth: key 'layers\.0\.attn\.qkv\.weight' has shape \(384, 128, 3\), expected "
     r"\(384, 128, 1\)"),
    ("vocoder", lambda sd: sd.pop("conv_pre.weight_g"), r"vocoder.pth: weight-norm key 'conv_pre\.weight_v' has no "
     r"partner 'conv_pre\.weight_g'"),
    ("vocoder", lambda sd: sd.__setitem__("conv_post.1.weight_v", torch.zeros(1, 16, 5)),
     r"key 'conv_post\.1\.weight' has shape \(1, 16, 5\), expected \(1, 16, 7\)"),
    ("clvp", lambda sd: sd.pop("temperature"), r"clvp2.pth: missing key 'temperature'"),
    ("rlg_auto", lambda sd: sd.__setitem__("layers.0.bias", torch.zeros(128, dtype=torch.int64)),
     r"rlg_auto.pth: key 'layers\.0\.bias' holds torch.int64 values"),
])
def test_bad_checkpoint_contents(small_ckpt_dir, tmp_path, component, edit, message):
    d = edit_checkpoint(small_ckpt_dir, tmp_path / "m", component, edit)
    with pytest.raises(CheckpointError, match=message):
        convert(d, tmp_path / "o.gguf", components=[component])
    assert not os.path.exists(tmp_path / "o.gguf") and not os.path.exists(tmp_path / "o.gguf.part")


def test_config_json_that_contradicts_the_shapes(small_ckpt_dir, tmp_path):
    d = copy_dir(small_ckpt_dir, tmp_path / "m", only={"rlg_auto.pth"})
    (d / "config.json").write_text(json.dumps({"rlg_auto": {"channels": 64}}))
    with pytest.raises(CheckpointError, match="config.json gives rlg_auto channels=64.*128"):
        convert(d, tmp_path / "o.gguf", components="rlg_auto")


def test_bad_options(small_ckpt_dir, tmp_path):
    with pytest.raises(ConvertError, match="unknown type 'q4'"):
        convert(small_ckpt_dir, tmp_path / "o.gguf", type="q4")
    with pytest.raises(ConvertError, match="unknown component.*gpt"):
        convert(small_ckpt_dir, tmp_path / "o.gguf", components="gpt,vocoder")


def test_missing_mel_norms(small_ckpt_dir, tmp_path, monkeypatch):
    import tortoise_ggml.weights.convert as cv
    monkeypatch.setattr(cv, "_tortoise_data_dir", lambda: None)
    d = copy_dir(small_ckpt_dir, tmp_path / "m", only={"rlg_auto.pth"})
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="mel_norms.pth not found"):
        convert(d, tmp_path / "o.gguf", components="rlg_auto")


def run_cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "tortoise_ggml.convert", *map(str, args)], capture_output=True,
                          text=True, env=env)


def test_cli_user_errors_exit_2_with_one_line(small_ckpt_dir, tmp_path, capsys):
    from tortoise_ggml.convert import main
    p = run_cli(tmp_path / "nowhere", "-o", tmp_path / "o.gguf")  # the real entry point, once
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "nowhere" in p.stderr
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        main([str(small_ckpt_dir), "-o", str(tmp_path / "o.gguf"), "--type", "q4"])
    assert e.value.code == 2 and "q4" in capsys.readouterr().err
    d = edit_checkpoint(small_ckpt_dir, tmp_path / "m", "rlg_auto", lambda sd: sd.pop("layers.5.bias"))
    assert main([str(d), "-o", str(tmp_path / "o.gguf"), "--components", "rlg_auto"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "layers.5.bias" in err


def test_cli_converts(small_ckpt_dir, tmp_path):
    from tortoise_ggml.convert import main
    assert main([str(small_ckpt_dir), "-o", str(tmp_path / "o.gguf"), "--type", "q8_0", "--components",
                 "rlg_auto,vocoder", "-q"]) == 0
    reader, tensors = read_gguf(tmp_path / "o.gguf")
    assert field(reader, "tortoise.components") == ["vocoder", "rlg_auto"]
    assert tensors["rlg_ar.layers.0.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_voices(small_ckpt_dir, tmp_path):
    vd = tmp_path / "voices"
    (vd / "alice").mkdir(parents=True)
    (vd / "bob").mkdir()
    lat = (torch.randn(1, 128), torch.randn(1, 256))
    torch.save(lat, vd / "alice" / "alice.pth")
    # (vd / "bob" holds nothing: skipped; clip voices: tests/test_voices.py)
    out = convert(small_ckpt_dir, tmp_path / "o.gguf", components="rlg_auto", voices_dir=vd)
    reader, tensors = read_gguf(out)
    assert field(reader, "tortoise.voices") == ["alice"]
    np.testing.assert_array_equal(as_float(tensors["voice.alice.autoregressive"]), lat[0].numpy())
    np.testing.assert_array_equal(as_float(tensors["voice.alice.diffusion"]), lat[1].numpy())
    torch.save(torch.zeros(3), vd / "alice" / "alice.pth")
    with pytest.raises(ConvertError, match="alice.pth: expected"):
        convert(small_ckpt_dir, tmp_path / "o2.gguf", components="rlg_auto", voices_dir=vd)
