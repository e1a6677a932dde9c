"""UnivNet vocoder (tortoise_ggml/models/vocoder.py) against tortoise-tts 3.0.0's UnivNetGenerator on the same random
weights (small config: 16 channels, noise_dim 16, dilations [1, 3], strides [8, 8, 4]), the same mel and noise.

Tolerance: both sides compute in float32, ours with other summation orders (mul_mat over whole windows instead of
unfold + einsum, one mul_mat per transposed conv). The error builds up through 3 blocks of 2 gated LVC layers with
kernels predicted by 6-conv networks; measured max abs error 6e-7..1.5e-6 over 6 draws (B=1 and 2; ggml's own
dot product or tinyBLAS) on waveforms of peak 0.3..0.5. ATOL = 2e-5 leaves a >10x margin yet catches any wrong
tap, channel or segment, which moves the output by >1e-2. The full-size config (32 channels, 4 layers per block)
agrees to ~2e-5 on peak ~0.9 (benchmarks/bench_vocoder.py).
"""
from types import SimpleNamespace

import numpy as np
import pytest

import pyggml as pg
from tortoise_ggml import kernels
from tortoise_ggml.models.vocoder import LVCBlock, UnivNetGenerator, Windows

ATOL = 2e-5
FRAMES = 12

COMPONENTS = ["vocoder"]  # what the shared model_file fixture loads


@pytest.fixture(scope="module")
def backend():
    # one thread: these graphs are tiny, and on a busy machine two threads spend more time syncing than computing
    return pg.Backend("cpu", threads=1)


@pytest.fixture(scope="module")
def vocoder(model_file, backend):
    return UnivNetGenerator(model_file, backend)


@pytest.fixture(scope="module")
def reference(oracle, small_ckpt_dir):
    return oracle.load("vocoder", "small", ckpt=str(small_ckpt_dir))


def _inputs(batch, frames, noise_dim, seed):
    rng = np.random.default_rng(seed)
    mel = (rng.standard_normal((batch, 100, frames)) * 2 - 5).astype(np.float32)
    z = rng.standard_normal((batch, noise_dim, frames + 10)).astype(np.float32)
    return mel, z


def _reference_wav(oracle, reference, mel, z):
    import torch
    return oracle.vocoder_run(reference, torch.from_numpy(mel), torch.from_numpy(z)).numpy()[:, 0]


FUSABLE = kernels.usable(pg.Backend("cpu", threads=1), 16, 32)


@pytest.mark.parametrize("fused", [pytest.param(True, marks=pytest.mark.skipif(
    not FUSABLE, reason="tortoise_ggml.kernels not built, or not for 16 channels")), False])
@pytest.mark.parametrize("batch", [1, 2])
def test_matches_reference(oracle, model_file, reference, batch, fused):
    """Both ways the residual stacks run on CPU: tortoise-ggml's fused kernels, and plain ggml ops."""
    # batch 2 with two threads, which split every op
    vocoder = UnivNetGenerator(model_file, pg.Backend("cpu", threads=batch), fused=fused)
    assert vocoder.fused == fused
    assert vocoder.noise_dim == oracle.CONFIGS["small"]["vocoder"]["noise_dim"]
    mel, z = _inputs(batch, FRAMES, vocoder.noise_dim, seed=batch)
    got = vocoder.inference(mel, z)
    assert got.shape == (batch, FRAMES * 256) and got.dtype == np.float32
    ref = _reference_wav(oracle, reference, mel, z)
    assert ref.std() > 0.01  # a real waveform, not a constant that anything would match
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)
    if batch == 2:  # the batch entries are independent: entry 1 alone gives the same audio
        np.testing.assert_allclose(vocoder.inference(mel[1:], z[1:])[0], got[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dilation,hop,c_in,rules", [(1, 8, 16, Windows(64, False)), (1, 8, 16, Windows(16, True)),
                                                      (1, 8, 16, Windows(1, False)), (3, 9, 5, Windows(64, False))])
def test_location_variable_convolution(oracle, backend, dilation, hop, c_in, rules):
    """The LVC core alone, against the reference's method, including the dilation the reference supports (and
    LVCBlock never uses): each hop segment convolved with its own kernel, windows reaching across segments. With
    16 input channels and a 64-float step the windows are widened by a zero-weighted 4th tap (ggml's dot product);
    copied out for tinyBLAS; viewed as they are otherwise."""
    import torch
    from tortoise.models.vocoder import LVCBlock as RefLVCBlock
    rng = np.random.default_rng(dilation)
    b, c_out, k, segments = 2, 6, 3, 4
    x = rng.standard_normal((b, c_in, segments * hop)).astype(np.float32)
    kernel = rng.standard_normal((b, c_in, c_out, k, segments)).astype(np.float32)
    bias = rng.standard_normal((b, c_out, segments)).astype(np.float32)
    with torch.no_grad():
        ref = RefLVCBlock.location_variable_convolution(
            None, torch.from_numpy(x), torch.from_numpy(kernel), torch.from_numpy(bias), dilation, hop).numpy()
    ctx = pg.Context()
    xt = ctx.new_tensor("f32", (c_in, segments * hop, b)).set_input()            # time-major
    kt = ctx.new_tensor("f32", (c_in * k, c_out, segments, b)).set_input()      # rows: tap-major
    bt = ctx.new_tensor("f32", (c_out, 1, segments, b)).set_input()
    block = SimpleNamespace(lvc_windows=rules)  # the method uses nothing else of its block
    out = LVCBlock.location_variable_convolution(block, ctx, xt, kt, bt, dilation, hop)
    backend.compute(pg.Graph(ctx, out), {
        xt: x.transpose(0, 2, 1),
        kt: kernel.transpose(0, 4, 2, 3, 1).reshape(b, segments, c_out, k * c_in),
        bt: bias.transpose(0, 2, 1)[:, :, None, :]})
    np.testing.assert_allclose(out.get().transpose(0, 2, 1), ref, rtol=1e-5, atol=1e-5)


def test_fused_refused_where_it_cannot_run(model_file):
    class NotCpu:  # a backend that cannot run custom ops, as CUDA cannot
        kind, threads = "cuda", None
    with pytest.raises(ValueError, match="fused vocoder kernels cannot run here"):
        UnivNetGenerator(model_file, NotCpu(), fused=True)


def test_noise_from_seed(vocoder):
    mel, _ = _inputs(1, 4, vocoder.noise_dim, seed=5)
    a = vocoder.inference(mel, seed=11)
    np.testing.assert_array_equal(a, vocoder.inference(mel, seed=11))
    assert np.abs(a - vocoder.inference(mel, seed=12)).max() > 1e-3
    z = np.random.default_rng(11).standard_normal((1, vocoder.noise_dim, 14), dtype=np.float32)
    np.testing.assert_array_equal(a, vocoder.inference(mel, z))
    assert np.abs(a).max() <= 1.0


def test_bad_inputs(vocoder):
    mel, z = _inputs(1, 4, vocoder.noise_dim, seed=6)
    with pytest.raises(ValueError, match=r"3-D \(batch, 100, frames\)"):
        vocoder.inference(mel[0])
    with pytest.raises(ValueError, match="80 channels"):
        vocoder.inference(mel[:, :80])
    with pytest.raises(ValueError, match="at least one"):
        vocoder.inference(mel[:, :, :0])
    with pytest.raises(TypeError, match="floats"):
        vocoder.inference(mel.astype(np.int32))
    with pytest.raises(TypeError, match="numpy array"):
        vocoder.inference(mel.tolist())
    bad = mel.copy()
    bad[0, 3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        vocoder.inference(bad)
    with pytest.raises(ValueError, match=r"z must have shape \(batch, noise_dim, frames \+ 10\)"):
        vocoder.inference(mel, z[:, :, :-1])
    z_inf = z.copy()
    z_inf[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="z contains NaN"):
        vocoder.inference(mel, z_inf)
    # float64 input is accepted (cast to float32)
    np.testing.assert_allclose(vocoder.inference(mel.astype(np.float64), z), vocoder.inference(mel, z), atol=1e-6)


def test_view_strided_windows(backend):
    """pyggml's Context.view_strided, which the vocoder's convolutions read their windows through: rows that
    overlap in memory, checked against the source's extent."""
    x = np.arange(2 * 7, dtype=np.float32).reshape(7, 2)          # 7 samples of 2 channels, time-major
    ctx = pg.Context()
    xt = ctx.new_tensor("f32", (2, 7)).set_input()
    win = ctx.view_strided(xt, (6, 5), (8,))                        # 5 windows of 3 samples, one sample apart
    out = ctx.cont(win)
    backend.compute(pg.Graph(ctx, out), {xt: x})
    np.testing.assert_array_equal(out.get(), np.stack([x[t:t + 3].reshape(-1) for t in range(5)]))
    with pytest.raises(pg.ShapeError, match="reaches byte 64, past the 56 bytes"):
        ctx.view_strided(xt, (6, 6), (8,))
