"""RandomLatentConverter (rlg_auto, rlg_diffuser) against tortoise-tts 3.0.0's on the same random weights and the
same noise (small config: 128 and 256 channels).

Tolerance: f32 weights agree to float32 rounding (measured max abs error ~7e-7 on outputs of magnitude ~2);
q8_0 weights (and q8_0 activations inside ggml's mul_mat) to ~2.5% of the output's largest magnitude.
"""
import numpy as np
import pytest

from tortoise_ggml.models.random_latent_generator import RandomLatentConverter
from tortoise_ggml.weights.model_file import ModelFile

COMPONENTS = ("rlg_auto", "rlg_diffuser")


def _reference(oracle, ckpt, component, noise):
    import torch
    ref = oracle.load(component, "small", ckpt)
    with torch.no_grad():
        return ref.layers(torch.from_numpy(noise)).numpy()


@pytest.mark.parametrize("component", COMPONENTS)
def test_matches_reference(oracle, small_ckpt_dir, model_file, component):
    import torch
    rlg = RandomLatentConverter(model_file, component=component)
    assert rlg.channels == oracle.CONFIGS["small"][component]["channels"]
    noise = np.random.default_rng(3).standard_normal((3, rlg.channels)).astype(np.float32)
    got = rlg(noise)
    assert got.shape == (3, rlg.channels) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(oracle, small_ckpt_dir, component, noise), rtol=1e-5, atol=1e-5)
    # the reference's own forward (as get_random_conditioning_latents calls it) draws torch.randn(1, channels):
    # fed the same draw, ours gives its latent
    ref = oracle.load(component, "small", small_ckpt_dir)
    torch.manual_seed(7)
    drawn = torch.randn(1, rlg.channels).numpy()
    torch.manual_seed(7)
    with torch.no_grad():
        expected = ref(torch.tensor([0.0])).numpy()
    np.testing.assert_allclose(rlg(drawn[0]), expected, rtol=1e-5, atol=1e-5)


def test_q8_0_weights(oracle, small_ckpt_dir, small_gguf_q8, backend):
    mf = ModelFile(small_gguf_q8, backend, components=["rlg_auto"])
    rlg = RandomLatentConverter(mf, component="rlg_auto")
    noise = np.random.default_rng(4).standard_normal((2, rlg.channels)).astype(np.float32)
    ref = _reference(oracle, small_ckpt_dir, "rlg_auto", noise)
    got = rlg(noise)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_sample_is_seedable(model_file):
    rlg = RandomLatentConverter(model_file, component="rlg_diffuser")
    a = rlg.sample(np.random.default_rng(1), batch=2)
    assert a.shape == (2, rlg.channels)
    np.testing.assert_array_equal(a, rlg.sample(1, batch=2))
    np.testing.assert_array_equal(
        a, rlg(np.random.default_rng(1).standard_normal((2, rlg.channels), dtype=np.float32)))
    assert not np.allclose(a, rlg.sample(2, batch=2))


def test_bad_input(model_file):
    rlg = RandomLatentConverter(model_file, component="rlg_auto")
    with pytest.raises(ValueError, match=r"\(batch, 128\)"):
        rlg(np.zeros((1, 64), np.float32))
    with pytest.raises(ValueError, match=r"\(batch, 128\)"):
        rlg(np.zeros((1, 1, 128), np.float32))
    with pytest.raises(TypeError, match="floating point"):
        rlg(np.zeros((1, 128), np.int64))
    with pytest.raises(ValueError, match="positive integer"):
        rlg.sample(0, batch=0)
    with pytest.raises(ValueError, match="rlg_auto, rlg_diffuser"):
        RandomLatentConverter(model_file, component="vocoder")
