"""The shared graph blocks (tortoise_ggml.layers) against torch.nn.functional."""
import numpy as np
import pytest

import pyggml as pg
from tortoise_ggml.models import layers

torch = pytest.importorskip("torch")
F = torch.nn.functional
RNG = np.random.default_rng(1)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def run(backend, build, *arrays):
    ctx = pg.Context()
    ins = [ctx.from_numpy(a).set_input() for a in arrays]
    out = build(ctx, *ins)
    backend.compute(pg.Graph(ctx, out), dict(zip(ins, arrays)))
    return out.get()


def t(a):
    return torch.from_numpy(a)


def test_linear_and_layer_norm(backend):
    x, w, b, g, beta = randn(2, 5, 16), randn(8, 16), randn(8), randn(8), randn(8)
    out = run(backend, lambda c, x_, w_, b_, g_, be_: layers.layer_norm(c, layers.linear(c, x_, w_, b_), g_, be_, 1e-5),
              x, w, b, g, beta)
    ref = F.layer_norm(F.linear(t(x), t(w), t(b)), (8,), t(g), t(beta), 1e-5)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-4)


def test_group_norm_affine(backend):
    x, w, b = randn(2, 8, 12), randn(8), randn(8)
    out = run(backend, lambda c, x_, w_, b_: layers.group_norm(c, x_, w_, b_, 4, 1e-5), x, w, b)
    np.testing.assert_allclose(out, F.group_norm(t(x), 4, t(w), t(b), 1e-5).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch,k,stride,pad,dil", [(1, 7, 1, 3, 1), (2, 3, 1, 1, 1), (1, 3, 1, 9, 9),
                                                    (2, 5, 2, 2, 1), (1, 1, 1, 0, 1), (3, 1, 1, 0, 1)])
def test_conv1d(backend, batch, k, stride, pad, dil):
    x, w, b = randn(batch, 6, 40), randn(5, 6, k), randn(5)
    out = run(backend, lambda c, x_, w_, b_: layers.conv1d(c, x_, w_, b_, stride, pad, dil), x, w, b)
    ref = F.conv1d(t(x), t(w), t(b), stride=stride, padding=pad, dilation=dil)
    np.testing.assert_allclose(out.reshape(ref.shape), ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride,pad,out_pad", [(8, 4, 0), (4, 2, 0), (2, 0, 0), (3, 1, 1)])
def test_conv_transpose1d(backend, stride, pad, out_pad):
    k = 2 * stride
    x, w, b = randn(6, 11), randn(6, 4, k), randn(4)
    out = run(backend, lambda c, x_, w_, b_: layers.conv_transpose1d(c, x_, w_, b_, stride, pad, out_pad), x, w, b)
    ref = F.conv_transpose1d(t(x)[None], t(w), t(b), stride=stride, padding=pad, output_padding=out_pad)[0]
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-4)


def test_attention_with_causal_mask(backend):
    b, h, tq, d = 2, 4, 6, 16
    q, k, v = randn(b, h, tq, d), randn(b, h, tq, d), randn(b, h, tq, d)
    mask = np.triu(np.full((tq, tq), -np.inf, np.float32), 1)
    ctx = pg.Context()
    qs = [ctx.from_numpy(a).set_input() for a in (q, k, v)]
    m = ctx.from_numpy(mask, type="f16").set_input()
    out = layers.attention(ctx, *qs, mask=m)                  # inputs ne (D, T, H, B) = numpy (B, H, T, D)
    backend.compute(pg.Graph(ctx, out), {**dict(zip(qs, (q, k, v))), m: mask.astype(np.float16)})
    ref = F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=t(mask))   # (B, H, T, D)
    np.testing.assert_allclose(out.get(), ref.permute(0, 2, 1, 3).reshape(b, tq, h * d).numpy(),
                               rtol=1e-3, atol=1e-4)


def test_split_heads_round_trip(backend):
    x = randn(2, 5, 12)                                      # (B, T, H*D), H=3
    out = run(backend, lambda c, x_: c.cont(layers.split_heads(c, x_, 3)), x)
    np.testing.assert_array_equal(out, x.reshape(2, 5, 3, 4).transpose(0, 2, 1, 3))
