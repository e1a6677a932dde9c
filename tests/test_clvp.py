"""CLVP scoring (tortoise_ggml.models.clvp, .xtransformers) against tortoise-tts 3.0.0's own classes, small config.

Tolerances (f32 weights): scores and L2-normalised latents within 1e-5 absolute + 1e-4 relative of the reference
(measured: about 3e-7 absolute); RMSNorm and GEGLU within 1e-6 + 1e-5 relative; rotary within 1e-4 of float64 exact
values (see its test). q8_0 weights: scores within 2e-2.
"""
import numpy as np
import pytest

import pyggml as pg
from tortoise_ggml.models import xtransformers as xt
from tortoise_ggml.models.arch_util import ModuleWeights
from tortoise_ggml.models.clvp import CLVP
from tortoise_ggml.weights.model_file import ModelFile

torch = pytest.importorskip("torch")

RTOL, ATOL = 1e-4, 1e-5

COMPONENTS = ["clvp"]  # what the shared model_file fixture loads
REFERENCE = "clvp"  # the component whose tortoise-tts model the shared reference fixture loads


@torch.no_grad()
def reference_scores(ref, text, codes):
    """The reference's scores (as api.py calls it) and its normalised text and speech latents, caught on the way."""
    caught = {}
    hooks = [getattr(ref, name).register_forward_hook(lambda m, i, o, name=name: caught.__setitem__(name, o))
             for name in ("to_text_latent", "to_speech_latent")]
    try:
        text = torch.as_tensor(text)
        scores = ref(text.repeat(codes.shape[0], 1) if text.shape[0] == 1 else text, torch.as_tensor(codes),
                     return_loss=False)
    finally:
        for h in hooks:
            h.remove()
    latents = [torch.nn.functional.normalize(caught[name], dim=-1).numpy()
               for name in ("to_text_latent", "to_speech_latent")]
    return scores.numpy(), *latents


def test_scores_and_latents_match_reference(model_file, reference, oracle):
    """api.py's call: one text (with its trailing pad 0) for 6 candidates of 500 codes."""
    rng = np.random.default_rng(0)
    text = oracle.text_tokens_for().numpy()
    codes = rng.integers(0, 8192, (6, 500))
    codes[:, -3:] = (45, 45, 248)         # what fix_autoregressive_output ends every candidate with
    codes[0, 200:] = 83                   # and how it fills a candidate that stopped early
    want, want_text, want_speech = reference_scores(reference, text, codes)
    clvp = CLVP(model_file)
    got, got_text, got_speech = clvp.forward(text, codes, return_latents=True)
    assert got.shape == (6,) and got.dtype == np.float32
    np.testing.assert_allclose(got_text, want_text, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got_speech, want_speech, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert np.argmax(got) == np.argmax(want)
    np.testing.assert_array_equal(clvp.forward(text, codes), got)


def test_text_per_candidate_and_chunks(model_file, reference):
    """One text row per candidate (two distinct texts, each encoded once) and chunks smaller than the batch."""
    rng = np.random.default_rng(1)
    texts = rng.integers(0, 256, (2, 40))
    text = texts[[0, 1, 1, 0, 1]]
    codes = rng.integers(0, 8192, (5, 120))
    want, want_text, _ = reference_scores(reference, text, codes)
    got, got_text, _ = CLVP(model_file, max_batch=2).forward(text, codes, return_latents=True)
    np.testing.assert_allclose(got_text, want_text, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("fused", [None, False], ids=["cpu_kernels", "plain_ggml"])
def test_q8_0_weights_score_close(small_gguf_q8, backend, reference, oracle, fused):
    """q8_0 matrices (activations quantised too, in kernels.q8_matmul on AVX-512 VNNI or AVX2 CPUs, else ggml's q8_0
    matmul): within 2e-2 of the reference's scores (measured 2e-3 to 5e-3 on scores of magnitude 0.1 to 0.4); f32 is
    what the parity tests above hold exact."""
    rng = np.random.default_rng(2)
    text = oracle.text_tokens_for().numpy()
    codes = rng.integers(0, 8192, (4, 300))
    want = reference_scores(reference, text, codes)[0]
    with ModelFile(small_gguf_q8, backend, components=["clvp"]) as mf:
        got = CLVP(mf, fused=fused).forward(text, codes)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-2)


@pytest.mark.parametrize("text, codes, error, words", [
    (np.zeros((1, 10), np.float32), np.zeros((2, 20), np.int64), TypeError, "integer"),
    (np.zeros(10, np.int64), np.zeros((2, 20), np.int64), ValueError, "2-D"),
    (np.zeros((1, 10), np.int64), np.full((2, 20), 8192), ValueError, "8192"),
    (np.full((1, 10), -1), np.zeros((2, 20), np.int64), ValueError, "-1"),
    (np.zeros((3, 10), np.int64), np.zeros((2, 20), np.int64), ValueError, "3 rows for 2"),
    (np.zeros((1, 0), np.int64), np.zeros((2, 20), np.int64), ValueError, "at least one"),
])
def test_bad_input_is_refused(model_file, text, codes, error, words):
    with pytest.raises(error, match=words):
        CLVP(model_file).forward(text, codes)


# ------------------------------------------------------------------------------------------------------------------
# the x-transformers pieces, against the reference's own functions
# ------------------------------------------------------------------------------------------------------------------
def _run(backend, build, inputs: dict):
    """Compute ``build(ctx, *input tensors)`` with F32 inputs given as numpy arrays."""
    with pg.Context() as ctx:
        ins = [ctx.new_tensor({"float32": "f32", "int32": "i32"}[a.dtype.name], tuple(reversed(a.shape))).set_input()
               for a in inputs]
        out = build(ctx, *ins)
        backend.compute(pg.Graph(ctx, out), dict(zip(ins, inputs)))
        return out.get()


def test_rotary_on_part_of_each_head(backend):
    """x-transformers' rotate-half rotary on the first 32 of 64 channels, at positions up to 499.

    At position ~500 the float32 angle itself is uncertain by ~1e-5 rad, in torch (one product) and in ggml (a
    running product of the frequency ratio) alike: both are held to float64 exact values, ggml within 1e-4 (torch
    is 3.7e-5 off, ggml 4.1e-5 measured)."""
    from tortoise.models.xtransformers import RotaryEmbedding, apply_rotary_pos_emb
    b, h, n, d, rot = 2, 3, 500, 64, 32
    t = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(0))
    freqs = RotaryEmbedding(rot)(n, "cpu")
    want = torch.cat((apply_rotary_pos_emb(t[..., :rot], freqs), t[..., rot:]), dim=-1).numpy()
    angle = np.arange(n)[:, None] / 10000.0 ** (np.arange(0, rot, 2) / rot)
    angle = np.concatenate([angle, angle], axis=1)
    x = t.double().numpy()
    half = np.concatenate([-x[..., rot // 2:rot], x[..., :rot // 2]], axis=-1)
    exact = np.concatenate([x[..., :rot] * np.cos(angle) + half * np.sin(angle), x[..., rot:]], axis=-1)
    assert np.abs(want - exact).max() < 1e-4    # the reference's own float32 error, for scale

    emb = xt.RotaryEmbedding(rot, RotaryEmbedding(rot).inv_freq.numpy())
    # ggml ne (d, h, n, b) = numpy (b, n, h, d)
    got = _run(backend, lambda ctx, x, p: xt.apply_rotary_pos_emb(ctx, x, emb.forward(p)),
               [np.ascontiguousarray(t.numpy().transpose(0, 2, 1, 3)), np.arange(n, dtype=np.int32)])
    got = got.transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(got[..., rot:], want[..., rot:])   # channels past the rotary dim are untouched


def test_rotary_refuses_other_frequencies():
    with pytest.raises(ValueError, match="inv_freq"):
        xt.RotaryEmbedding(32, np.ones(16, np.float32))


def test_rms_norm_and_geglu(backend):
    from tortoise.models.xtransformers import GLU, RMSNorm
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 48, generator=g)
    x[0, 3] = 0.0                    # the clamp: a zero row stays zero
    x[1, 2] *= 1e-6                  # and a tiny one is scaled up like any other
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.g.copy_(1 + 0.1 * torch.randn(48, generator=g))
        glu = GLU(48, 32, torch.nn.GELU())
        want_norm, want_glu = norm(x).numpy(), glu(x).numpy()
    wctx = pg.Context()
    wt = {"g": wctx.new_tensor("f32", (48,)), "proj.weight": wctx.new_tensor("f32", (48, 64)),
          "proj.bias": wctx.new_tensor("f32", (64,))}
    buf = backend.alloc_tensors(wctx)
    wt["g"].set(norm.g.detach().numpy())
    wt["proj.weight"].set(glu.proj.weight.detach().numpy())
    wt["proj.bias"].set(glu.proj.bias.detach().numpy())
    w = ModuleWeights(wt, "test")
    ours_norm, ours_glu = xt.RMSNorm(w, 48), xt.GLU(w.sub("proj"), 48, 32)
    got_norm = _run(backend, lambda ctx, a: ours_norm.forward(ctx, a), [x.numpy()])
    got_glu = _run(backend, lambda ctx, a: ours_glu.forward(ctx, a), [x.numpy()])
    np.testing.assert_allclose(got_norm, want_norm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_glu, want_glu, rtol=1e-5, atol=1e-6)
    del buf
