"""The diffusion decoder (tortoise_ggml/models/diffusion_decoder.py) and its sampler (tortoise_ggml/diffusion.py)
against tortoise-tts 3.0.0's DiffusionTts, SpacedDiffusion and do_spectrogram_diffusion on the same random weights
(small config: 128 channels, 2 layers, 4 heads; zero-initialised blocks randomised).

Lengths are chosen past the relative position bias' max distance (64), so every bucket, the clamped ones too, is
used, and with a non-integer code -> frame ratio (S codes -> S*4*24000//22050 frames).

Tolerances (both sides float32, ours with other summation orders; measured on this config):
  * timestep_independent: max abs error ~4e-6 on values up to ~10 -> ATOL_EMB 5e-5.
  * one forward step (cond / cond-free): ~1-3e-6 on outputs up to ~1.7 -> ATOL_STEP 3e-5.
  * get_conditioning: ~6e-7 on values up to ~1.2 -> ATOL_STEP.
  * one step from an f16 / q8_0 file (weights, and for q8_0 the activations inside each product, rounded):
    max error ~5e-4 / ~1.8e-2 of the output's peak -> 2e-3 / 5e-2; a wrong tap or channel gives O(1).
  * the whole do_spectrogram_diffusion with our noise fed to the reference: ~1.5e-4 on denormalised mels spanning
    [-11.5, 2.3]. The sampler divides by sqrt(alpha_cumprod) (x_0 = x_t/sqrt(a) - sqrt(1/a-1) eps, up to ~150x at
    the first step), so model differences grow; ATOL_MEL 2e-3 is still far below what any wrong coefficient, noise
    order or guidance weight gives (> 0.1).
"""
import numpy as np
import pytest

import pyggml as pg
from tortoise_ggml import api
from tortoise_ggml.models.config import AudioConfig
from tortoise_ggml.models.diffusion_decoder import DiffusionTts, nearest_indices
from tortoise_ggml.models.xtransformers import relative_position_buckets
from tortoise_ggml.utils import diffusion as D
from tortoise_ggml.weights.model_file import ModelFile


def output_seq_len(n_codes: int) -> int:
    """tortoise/api.py's n * 4 * 24000 // 22050, from the defaults of the file's audio config."""
    return AudioConfig().diffusion_frames(n_codes, 1024)

torch = pytest.importorskip("torch")

REFERENCE = "diffusion"  # the component whose tortoise-tts model the shared reference fixture loads

ATOL_EMB = 5e-5
ATOL_STEP = 3e-5
ATOL_MEL = 2e-3
N_CODES = 40                      # -> 87 frames


@pytest.fixture(scope="module")
def model(small_gguf, backend):
    return DiffusionTts(ModelFile(small_gguf, backend, components=["diffusion"]), backend)


@pytest.fixture(scope="module")
def inputs(model):
    rng = np.random.default_rng(7)
    c = model.model_channels
    length = output_seq_len(N_CODES)
    return {
        "latents": rng.standard_normal((2, N_CODES, model.in_latent_channels)).astype(np.float32),
        "codes": rng.integers(0, model.in_tokens, (2, N_CODES)),
        "cond": rng.standard_normal((2, 2 * c)).astype(np.float32),
        "x": rng.standard_normal((2, model.in_channels, length)).astype(np.float32),
        "mels": (rng.standard_normal((2, 2, model.in_channels, 300)) - 4).astype(np.float32),
    }


def T(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# ------------------------------------------------------------------------------------------------------------------
# index tables
# ------------------------------------------------------------------------------------------------------------------
def test_relative_position_buckets_match_reference():
    from tortoise.models.xtransformers import RelativePositionBias
    n = 1500
    pos = torch.arange(n)
    ref = RelativePositionBias._relative_position_bucket(pos[None, :] - pos[:, None], causal=False, num_buckets=32,
                                                         max_distance=64)
    ours = relative_position_buckets(n, 32, 64)                        # by distance key - query, from -(n-1)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    np.testing.assert_array_equal(ours[j - i + n - 1], ref.numpy())


def test_nearest_indices_match_interpolate():
    F = torch.nn.functional
    cases = [(s, output_seq_len(s)) for s in range(1, 400)] + [(7, 7), (7, 14), (9, 4), (500, 1088)]
    for s, length in cases:
        ref = F.interpolate(torch.arange(s, dtype=torch.float32)[None, None], size=length, mode="nearest")
        np.testing.assert_array_equal(nearest_indices(s, length), ref[0, 0].long().numpy(), err_msg=f"{s}->{length}")


# ------------------------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------------------------
def test_reads_hparams(model, oracle):
    cfg = oracle.CONFIGS["small"]["diffusion"]
    for k in ("model_channels", "num_layers", "in_channels", "out_channels", "in_latent_channels", "num_heads"):
        assert getattr(model, k) == cfg[k], k


def test_timestep_independent_latents(model, reference, inputs):
    length = output_seq_len(N_CODES)
    ours, mel_pred = model.timestep_independent(inputs["latents"], inputs["cond"], length, True)
    with torch.no_grad():
        ref, ref_mel_pred = reference.timestep_independent(T(inputs["latents"]), T(inputs["cond"]), length, True)
    assert ours.shape == (2, model.model_channels, length) and ours.dtype == np.float32
    assert ref.abs().max() > 1
    np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=ATOL_EMB)
    np.testing.assert_allclose(mel_pred, ref_mel_pred.numpy(), rtol=0, atol=ATOL_EMB)
    # batch entries are independent
    np.testing.assert_allclose(model.timestep_independent(inputs["latents"][1:], inputs["cond"][1:], length)[0],
                               ours[1], rtol=0, atol=1e-6)


def test_timestep_independent_codes(model, reference, inputs):
    length = output_seq_len(N_CODES)
    ours = model.timestep_independent(inputs["codes"], inputs["cond"], length)
    with torch.no_grad():
        ref = reference.timestep_independent(T(inputs["codes"]), T(inputs["cond"]), length, False)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=ATOL_EMB)


@pytest.fixture(scope="module")
def plain_model(small_gguf, backend):
    """The same model with every attention softmax as plain ggml ops (no tortoise_ggml.kernels)."""
    return DiffusionTts(ModelFile(small_gguf, backend, components=["diffusion"]), backend, fused=False)


@pytest.mark.parametrize("fused", [True, False], ids=["relpos_kernel", "ggml_soft_max"])
@pytest.mark.parametrize("conditioning_free", [False, True])
def test_forward_step(model, plain_model, reference, oracle, inputs, conditioning_free, fused):
    if fused and not model.fused:
        pytest.skip("tortoise_ggml.kernels not built")
    model = model if fused else plain_model
    assert model.fused == fused
    length = output_seq_len(N_CODES)
    with torch.no_grad():
        pre = reference.timestep_independent(T(inputs["latents"]), T(inputs["cond"]), length, False)
    t = np.array([500, 3210])
    ref = oracle.diffusion_step(reference, T(inputs["x"]), T(t), pre, conditioning_free=conditioning_free).numpy()
    ours = model.forward(inputs["x"], t, precomputed_aligned_embeddings=pre.numpy(),
                         conditioning_free=conditioning_free)
    assert ours.shape == (2, model.out_channels, length)
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL_STEP)


@pytest.mark.parametrize("qtype,fused", [("f16", None), ("q8_0", None), ("q8_0", False)],
                         ids=["f16", "q8_0", "q8_0-plain_ggml"])
def test_forward_step_reduced_types(small_ckpt_dir, small_gguf_q8, tmp_path_factory, backend, reference, oracle,
                                    inputs, qtype, fused):
    """f16 / q8_0 files store the convolution kernels flattened, as matrices (q8_0 ones in the AMX layout where
    the CPU has it): one step stays close to the reference's, through the CPU kernels (q8_matmul where AVX-512
    VNNI or AVX2 runs it) and through plain ggml ops. (The two q8_0 paths differ from each other by ~1e-2 relative, as
    each does from the reference: a float rounding apart before an activation is quantized moves it a whole
    q8_0 step, and the random small model amplifies that; with f32 weights they agree to ~1e-6.)"""
    from tortoise_ggml.convert import convert
    path = small_gguf_q8 if qtype == "q8_0" else convert(
        small_ckpt_dir, tmp_path_factory.mktemp("diff_f16") / "diff-f16.gguf", type="f16", components=["diffusion"])
    model = DiffusionTts(ModelFile(path, backend, components=["diffusion"]), backend, fused=fused)
    assert model.layers[0].resblk.out_layers[1].matrix
    length = output_seq_len(N_CODES)
    with torch.no_grad():
        pre = reference.timestep_independent(T(inputs["latents"]), T(inputs["cond"]), length, False)
    t = np.array([500, 3210])
    ref = oracle.diffusion_step(reference, T(inputs["x"]), T(t), pre).numpy()
    ours = model.forward(inputs["x"], t, precomputed_aligned_embeddings=pre.numpy())
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < (2e-3 if qtype == "f16" else 5e-2)


def test_fused_refused_where_it_cannot_run(small_gguf, backend):
    class NotCpu:  # a backend that cannot run custom ops, as CUDA cannot
        kind, threads = "cuda", None
    with pytest.raises(ValueError, match="fused attention kernel cannot run on the cuda backend"):
        DiffusionTts(ModelFile(small_gguf, backend, components=["diffusion"]), NotCpu(), fused=True)


def test_forward_mixed_batch_is_one_step_of_each(model, inputs):
    """The sampler's batch [conditioned, conditioning-free] gives what two separate calls give (to float32 rounding:
    the matmul kernels tile a batch of 2 differently from a batch of 1, so sums are ordered differently)."""
    length = output_seq_len(N_CODES)
    pre = model.timestep_independent(inputs["latents"][:1], inputs["cond"][:1], length)
    x = inputs["x"][:1]
    both = model.forward(np.concatenate([x, x]), [700, 700], precomputed_aligned_embeddings=np.concatenate([pre, pre]),
                         conditioning_free=np.array([False, True]))
    np.testing.assert_allclose(both[0], model.forward(x, [700], precomputed_aligned_embeddings=pre)[0],
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(both[1], model.forward(x, [700], conditioning_free=True)[0], rtol=0, atol=1e-5)
    # without precomputed embeddings forward computes them from the latents
    np.testing.assert_allclose(model.forward(x, [700], inputs["latents"][:1], inputs["cond"][:1]), both[:1],
                               rtol=0, atol=1e-5)


def test_get_conditioning(model, reference, inputs):
    ours = model.get_conditioning(inputs["mels"])
    with torch.no_grad():
        ref = reference.get_conditioning(T(inputs["mels"])).numpy()
    assert ours.shape == (2, 2 * model.model_channels)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL_STEP)
    with torch.no_grad():
        ref1 = reference.get_conditioning(T(inputs["mels"][:, 0])).numpy()   # one clip, (B, 100, T)
    np.testing.assert_allclose(model.get_conditioning(inputs["mels"][:, 0]), ref1, rtol=0, atol=ATOL_STEP)


def test_bad_inputs_raise(model, inputs):
    length = output_seq_len(N_CODES)
    with pytest.raises(ValueError, match="channels"):
        model.forward(inputs["x"][:, :50], [1, 1], conditioning_free=True)
    with pytest.raises(ValueError, match="timesteps"):
        model.forward(inputs["x"], [1, 2, 3], conditioning_free=True)
    with pytest.raises(ValueError, match="precomputed_aligned_embeddings or"):
        model.forward(inputs["x"], [1, 1])
    with pytest.raises(ValueError, match="aligned embeddings"):
        model.forward(inputs["x"], [1, 1], precomputed_aligned_embeddings=np.zeros((2, 3, length), np.float32))
    with pytest.raises(ValueError, match="conditioning_latent"):
        model.timestep_independent(inputs["latents"], inputs["cond"][:, :10], length)
    with pytest.raises(ValueError, match=r"\[0, 8193\)"):
        model.timestep_independent(inputs["codes"] + 8193, inputs["cond"], length)
    with pytest.raises(TypeError, match="dtype"):
        model.timestep_independent(inputs["latents"].astype(bool), inputs["cond"], length)
    with pytest.raises(ValueError, match="NaN"):
        model.get_conditioning(np.full((1, 100, 40), np.nan, np.float32))
    with pytest.raises(pg.ShapeError, match="does not tile"):   # the op the relative position bias uses
        pg.Context().repeat_4d(pg.Context().new_tensor("f32", (3, 2)), 4, 2)


# ------------------------------------------------------------------------------------------------------------------
# the sampler
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [30, 200, 37])
def test_spaced_schedule_matches_reference(steps, oracle):  # oracle: tortoise imports need its torchaudio shim
    from tortoise.api import load_discrete_vocoder_diffuser
    ref = load_discrete_vocoder_diffuser(desired_diffusion_steps=steps, cond_free=True, cond_free_k=2)
    ours = api.load_discrete_vocoder_diffuser(desired_diffusion_steps=steps, cond_free=True, cond_free_k=2)
    assert ours.timestep_map == ref.timestep_map and ours.num_timesteps == ref.num_timesteps == steps
    for name in ("betas", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                 "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(ref, name), err_msg=name)
    assert D.space_timesteps(4000, "ddim50") == set(range(0, 4000, 80))


def _reference_sample(monkeypatch, reference, latents, cond, steps, cond_free, temperature, seed):
    """tortoise.api.do_spectrogram_diffusion with torch.randn / randn_like replaced by the draws our sampler makes
    from numpy.random.default_rng(seed), in the same order (start noise, then one draw per step)."""
    import tortoise.api as api
    rng = np.random.default_rng(seed)

    def randn(*shape, **kw):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))

    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: randn(tuple(x.shape)))
    diffuser = api.load_discrete_vocoder_diffuser(desired_diffusion_steps=steps, cond_free=cond_free, cond_free_k=2)
    with torch.no_grad():
        out = api.do_spectrogram_diffusion(reference, diffuser, T(latents), T(cond), temperature=temperature,
                                           verbose=False).numpy()
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("steps,cond_free,temperature", [(4, True, 1.0), (3, False, 0.8)])
def test_do_spectrogram_diffusion(model, reference, inputs, monkeypatch, steps, cond_free, temperature):
    latents, cond = inputs["latents"][:1, :30], inputs["cond"][:1]
    diffuser = api.load_discrete_vocoder_diffuser(desired_diffusion_steps=steps, cond_free=cond_free, cond_free_k=2)
    seen = []
    ours = api.do_spectrogram_diffusion(model, diffuser, latents, cond, temperature=temperature, rng=11,
                                      progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, steps) for i in range(steps)]
    ref = _reference_sample(monkeypatch, reference, latents, cond, steps, cond_free, temperature, 11)
    assert ours.shape == ref.shape == (1, 100, output_seq_len(30))
    assert ref.std() > 1
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL_MEL)
    # the same seed gives the same mel; another seed another one
    again = api.do_spectrogram_diffusion(model, diffuser, latents, cond, temperature, True, np.random.default_rng(11))
    np.testing.assert_array_equal(again, ours)
    other = api.do_spectrogram_diffusion(model, diffuser, latents, cond, temperature=temperature, rng=12)
    assert np.abs(other - ours).max() > 0.1


def test_sampler_bad_inputs(model, inputs):
    diffuser = api.load_discrete_vocoder_diffuser(desired_diffusion_steps=2)
    with pytest.raises(ValueError, match="temperature"):
        api.do_spectrogram_diffusion(model, diffuser, inputs["latents"][:1], inputs["cond"][:1], temperature=-1)
    with pytest.raises(ValueError, match="cannot divide"):
        api.load_discrete_vocoder_diffuser(desired_diffusion_steps=4001)
