"""The diffusion trunk's CPU kernels (q8_matmul.c: im2col, q8_matmul, f32_matmul; group_norm.c) against numpy /
torch and against ggml's own ops.

* im2col: exact (a copy) against a numpy im2col of time-major data.
* q8_matmul: against ggml's own mul_mat of the same Q8_0 weight on the same columns, which quantizes the
  activations the same way; only the order of the float additions differs: measured max abs error ~1e-5 on
  outputs of magnitude ~30 (tolerance 1e-6 relative to the largest output). Against float64 numpy it is as far
  as q8_0 rounding puts it (~1e-2 relative). A wrong tap, row, block scale or column moves outputs by >1.
* f32_matmul: against float64 numpy; measured ~1e-6 relative to the largest output.
* group_norm: against torch's GroupNorm (and the ResBlock's scale/shift and SiLU), float32 both sides; measured
  ~1e-6.
"""
import numpy as np
import pytest

import pyggml as pg
from tortoise_ggml import kernels

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not kernels.available(), reason="tortoise_ggml kernels library not built")
q8 = pytest.mark.skipif(not kernels.available() or not kernels._lib.tg_q8_matmul_available(),
                        reason="q8_matmul needs AVX-512 VNNI or AVX2")


@pytest.fixture(scope="module", params=[1, 2], ids=["1thread", "2threads"])
def cpu(request):
    return pg.Backend("cpu", threads=request.param)


def np_im2col(x, taps):
    """x (B, T, C) time-major -> (B, T, C*taps), element c*taps + j = x[t - pad + j, c]."""
    b, t, c = x.shape
    pad = (taps - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, taps - 1 - pad), (0, 0)))
    cols = np.stack([xp[:, j:j + t] for j in range(taps)], axis=-1)      # (B, T, C, taps)
    return cols.reshape(b, t, c * taps)


@pytest.mark.parametrize("c,t,bsz,taps", [(64, 7, 1, 3), (32, 1, 2, 3), (48, 13, 2, 1), (16, 5, 1, 5)])
def test_im2col_matches_numpy(cpu, c, t, bsz, taps):
    x = np.random.default_rng(c + t).standard_normal((bsz, t, c)).astype(np.float32)
    ctx = pg.Context()
    xt = ctx.new_tensor("f32", (c, t, bsz)).set_input()
    y = kernels.im2col(ctx, xt, taps)
    cpu.compute(pg.Graph(ctx, y), {xt: x})
    np.testing.assert_array_equal(y.get().reshape(bsz, t, c * taps), np_im2col(x, taps))


def _weight(backend, w):
    ctx = pg.Context()
    wt = ctx.new_tensor("q8_0", (w.shape[1], w.shape[0]))
    buf = backend.alloc_tensors(ctx)
    wt.set(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0))
    return wt, (ctx, buf)


# the diffusion trunk's shapes (1x1 and k3 convs, qkv) at the small test size and a wider one; odd multiples of 16
# rows (the last row tile of 16), column counts that are and are not multiples of the 6-column tile, one frame
# (1 to 4 columns: the in-place row loop, at a decode step's 1024 x 4096 too; 5 and more: panels)
@pytest.mark.parametrize("m,c,taps,t,bsz", [
    (64, 64, 1, 37, 2), (192, 64, 1, 12, 1), (80, 32, 3, 25, 2), (1024, 256, 3, 47, 2), (16, 32, 1, 1, 1),
    (48, 96, 3, 6, 1), (32, 32, 3, 1, 2), (1024, 4096, 1, 1, 1), (48, 96, 3, 1, 1), (64, 64, 1, 3, 1),
    (80, 32, 3, 2, 2), (32, 64, 1, 5, 1),
])
@pytest.mark.parametrize("bias,residual", [(True, False), (False, False), (True, True), (False, True)])
@q8
def test_q8_matmul_matches_ggml(cpu, m, c, taps, t, bsz, bias, residual):
    rng = np.random.default_rng(m + c + t)
    k = c * taps
    w = (rng.standard_normal((m, k)) * 0.1).astype(np.float32)
    x = rng.standard_normal((bsz, t, c)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    r = rng.standard_normal((bsz, t, m)).astype(np.float32)
    wt, keep = _weight(cpu, w)
    ctx = pg.Context()
    xt = ctx.new_tensor("f32", (c, t, bsz)).set_input()
    bt = ctx.new_tensor("f32", (m,)).set_input()
    rt = ctx.new_tensor("f32", (m, t, bsz)).set_input()
    ours = kernels.q8_matmul(ctx, wt, kernels.q8_pack(ctx, xt, taps), k, bt if bias else None,
                             rt if residual else None)
    theirs = ctx.mul_mat(wt, ctx.reshape(kernels.im2col(ctx, xt, taps), k, t * bsz))
    feed = {xt: x, **({bt: b} if bias else {}), **({rt: r} if residual else {})}
    cpu.compute(pg.Graph(ctx, ours, theirs), feed)
    want = theirs.get().reshape(bsz, t, m) + (b if bias else 0) + (r if residual else 0)
    got = ours.get().reshape(bsz, t, m)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max() + 1e-6)
    exact = np_im2col(x, taps).astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0) + (r if residual else 0)
    assert np.abs(got - exact).max() < 2e-2 * np.abs(exact).max()


@pytest.mark.parametrize("m,k,t,bsz", [(64, 64, 37, 2), (48, 300, 13, 1), (1024, 3072, 25, 1), (16, 16, 1, 1)])
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("wtype", ["f32", "f16"])
def test_f32_matmul_matches_numpy(cpu, m, k, t, bsz, bias, residual, wtype):
    """F32 both sides (an F16 weight is widened exactly: numpy gets the same rounded weights), other summation
    orders: tolerance 1e-5 relative to the largest output (measured ~1e-6)."""
    if not kernels._lib.tg_f32_matmul_available():
        pytest.skip("f32_matmul needs AVX-512 or AVX2")
    rng = np.random.default_rng(m + k + t)
    w = (rng.standard_normal((m, k)) * 0.1).astype(np.float32)
    if wtype == "f16":
        w = w.astype(np.float16).astype(np.float32)
    x = rng.standard_normal((bsz, t, k)).astype(np.float32)
    b, r = rng.standard_normal(m).astype(np.float32), rng.standard_normal((bsz, t, m)).astype(np.float32)
    ctx = pg.Context()
    wt = ctx.new_tensor(wtype, (k, m)).set_input()
    xt = ctx.new_tensor("f32", (k, t, bsz)).set_input()
    bt, rt = ctx.new_tensor("f32", (m,)).set_input(), ctx.new_tensor("f32", (m, t, bsz)).set_input()
    y = kernels.f32_matmul(ctx, wt, xt, bt if bias else None, rt if residual else None)
    feed = {wt: w.astype(np.float16) if wtype == "f16" else w, xt: x}
    cpu.compute(pg.Graph(ctx, y), {**feed, **({bt: b} if bias else {}), **({rt: r} if residual else {})})
    want = x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0) + (r if residual else 0)
    np.testing.assert_allclose(y.get().reshape(bsz, t, m), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("k,m,n,heads,batch", [(64, 480, 470, 4, 2), (480, 64, 13, 3, 1), (16, 16, 1, 1, 2)])
def test_f32_matmul_batched_matches_mul_mat(cpu, k, m, n, heads, batch):
    """Attention's products (a weight per head and batch entry), as ggml's mul_mat computes them: tolerance 1e-5
    relative to the largest output (other summation orders)."""
    if not kernels._lib.tg_f32_matmul_available():
        pytest.skip("f32_matmul needs AVX-512 or AVX2")
    rng = np.random.default_rng(k + m + n)
    w = rng.standard_normal((batch, heads, m, k)).astype(np.float32)
    x = rng.standard_normal((batch, heads, n, k)).astype(np.float32)
    ctx = pg.Context()
    wt = ctx.new_tensor("f32", (k, m, heads, batch)).set_input()
    xt = ctx.new_tensor("f32", (k, n, heads, batch)).set_input()
    ours, theirs = kernels.f32_matmul(ctx, wt, xt), ctx.mul_mat(wt, xt)
    assert ours.ne == theirs.ne
    cpu.compute(pg.Graph(ctx, ours, theirs), {wt: w, xt: x})
    want = np.einsum("bhmk,bhnk->bhnm", w.astype(np.float64), x)
    got = ours.get().reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(got, theirs.get().reshape(want.shape), rtol=0, atol=1e-5 * np.abs(want).max())
    with pytest.raises(pg.ShapeError, match="no bias or residual"):
        kernels.f32_matmul(ctx, wt, xt, bias=ctx.new_tensor("f32", (m,)))
    with pytest.raises(pg.ShapeError, match="columns must be"):
        kernels.f32_matmul(ctx, wt, ctx.new_tensor("f32", (k, n, heads + 1, batch)))


@q8
def test_q8_pack_quantizes_as_ggml():
    """The packed columns hold quantize_row_q8_0's blocks: F16-rounded scales, nearest-even rounding, and the
    -128 * sum(q) correction."""
    x = np.random.default_rng(3).standard_normal((1, 2, 64)).astype(np.float32)
    x[0, 1, :32] = 0.0  # an all-zero block: scale 0, quants 0
    ctx = pg.Context()
    xt = ctx.new_tensor("f32", (64, 2, 1)).set_input()
    p = kernels.q8_pack(ctx, xt, 1)
    pg.Backend("cpu").compute(pg.Graph(ctx, p), {xt: x})
    raw = p.get().reshape(2, -1).view(np.uint8)
    want = gguf.quants.quantize(x.reshape(-1, 32), gguf.GGMLQuantizationType.Q8_0).reshape(2, 2, 34)
    for n in range(2):
        q = raw[n, :64].view(np.int8).reshape(2, 32)
        d = raw[n, 64:72].view(np.float32)
        corr = raw[n, 72:80].view(np.int32)
        np.testing.assert_array_equal(q, want[n, :, 2:].view(np.int8))
        np.testing.assert_array_equal(d, want[n, :, :2].copy().view(np.float16).astype(np.float32).ravel())
        np.testing.assert_array_equal(corr, -128 * q.astype(np.int32).sum(axis=1))


@pytest.mark.parametrize("c,groups,t,bsz,emb,silu", [
    (64, 16, 37, 2, True, True), (64, 16, 37, 2, False, True), (1024, 32, 20, 1, False, False),
    (96, 32, 5, 2, True, False), (24, 8, 9, 1, False, True),
])
def test_group_norm_matches_torch(cpu, c, groups, t, bsz, emb, silu):
    rng = np.random.default_rng(c + t)
    x = (rng.standard_normal((bsz, c, t)) * 3 + 1.5).astype(np.float32)
    gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    e = rng.standard_normal((bsz, 2 * c)).astype(np.float32)
    gn = torch.nn.GroupNorm(groups, c)
    gn.weight.data, gn.bias.data = torch.from_numpy(gamma), torch.from_numpy(beta)
    with torch.no_grad():
        ref = gn(torch.from_numpy(x))
        if emb:
            scale, shift = torch.from_numpy(e).chunk(2, dim=1)
            ref = ref * (1 + scale[..., None]) + shift[..., None]
        if silu:
            ref = torch.nn.functional.silu(ref)
    ctx = pg.Context()
    xt = ctx.new_tensor("f32", (c, t, bsz)).set_input()
    gt, bt = ctx.new_tensor("f32", (c,)).set_input(), ctx.new_tensor("f32", (c,)).set_input()
    et = ctx.new_tensor("f32", (2 * c, bsz)).set_input()
    y = kernels.group_norm(ctx, xt, gt, bt, groups, 1e-5, et if emb else None, silu)
    cpu.compute(pg.Graph(ctx, y), {xt: x.transpose(0, 2, 1), gt: gamma, bt: beta, **({et: e} if emb else {})})
    np.testing.assert_allclose(y.get().reshape(bsz, t, c).transpose(0, 2, 1), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_trunk_kernels_refuse_bad_shapes():
    ctx = pg.Context()
    x = ctx.new_tensor("f32", (64, 5, 2))
    g = ctx.new_tensor("f32", (64,))
    with pytest.raises(pg.ShapeError, match="taps must be odd"):
        kernels.im2col(ctx, x, 2)
    with pytest.raises(pg.ShapeError, match="not a multiple of 32"):
        kernels.q8_pack(ctx, ctx.new_tensor("f32", (100, 5, 2)), 3)
    with pytest.raises(pg.ShapeError, match="time-major"):
        kernels.group_norm(ctx, ctx.transpose(x), g, g, 16, 1e-5)
    with pytest.raises(pg.ShapeError, match="do not split into 24 groups"):
        kernels.group_norm(ctx, x, g, g, 24, 1e-5)
    with pytest.raises(pg.ShapeError, match="emb must be"):
        kernels.group_norm(ctx, x, g, g, 16, 1e-5, emb=ctx.new_tensor("f32", (64, 2)))
    w = ctx.new_tensor("f32", (64, 32))
    with pytest.raises(pg.ShapeError, match="plain contiguous Q8_0"):
        kernels.q8_matmul(ctx, w, x, 64)
    wq = ctx.new_tensor("q8_0", (64, 32))
    with pytest.raises(pg.ShapeError, match="columns must come from q8_pack"):
        kernels.q8_matmul(ctx, wq, x, 64)
    with pytest.raises(pg.ShapeError, match="residual must be"):
        kernels.q8_matmul(ctx, wq, kernels.q8_pack(ctx, x), 64, None, ctx.new_tensor("f32", (32, 4, 2)))
    with pytest.raises(pg.ShapeError, match="weight must be contiguous F32"):
        kernels.f32_matmul(ctx, ctx.new_tensor("f32", (64, 24)), x)
    with pytest.raises(pg.ShapeError, match="columns must be contiguous F32"):
        kernels.f32_matmul(ctx, w, ctx.transpose(x))
