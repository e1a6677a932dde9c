"""tortoise_ggml.kernels (conv_time_major.c, run as ggml custom ops) against torch: the 'same' convolution with
bias and leaky ReLU, and the location-variable convolution with the gated residual (the reference's own method).

Tolerances: float32 on both sides with other summation orders (and FMA); measured max abs error ~3e-6 on outputs
of magnitude ~9 (conv) and ~1.5e-6 (LVC, gated outputs of magnitude ~3). A wrong tap, channel, segment or border
sample moves outputs by >1e-1.
"""
import numpy as np
import pytest

import pyggml as pg
from tortoise_ggml import kernels

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not kernels.available(), reason="tortoise_ggml kernels library not built")

VW = kernels.vector_width()


@pytest.fixture(scope="module", params=[1, 2], ids=["1thread", "2threads"])
def cpu(request):
    return pg.Backend("cpu", threads=request.param)


def _conv(cpu, x, w, b, dilation, slope):
    """x (B, C_in, T), w (C_out, C_in, K) torch layouts -> ours, back in torch layout."""
    bsz, c_in, t = x.shape
    c_out, _, k = w.shape
    ctx = pg.Context()
    xt = ctx.new_tensor("f32", (c_in, t, bsz)).set_input()
    wt = ctx.new_tensor("f32", (c_out, c_in * k)).set_input()
    bt = ctx.new_tensor("f32", (c_out,)).set_input() if b is not None else None
    y = kernels.conv1d(ctx, xt, wt, bt, k, dilation, dilation * (k - 1) // 2, slope)
    feed = {xt: x.transpose(0, 2, 1), wt: w.transpose(2, 1, 0).reshape(k * c_in, c_out)}
    if b is not None:
        feed[bt] = b
    cpu.compute(pg.Graph(ctx, y), feed)
    return y.get().reshape(bsz, t, c_out).transpose(0, 2, 1)


# channel counts the vocoder uses (16/32 in, 32/64 out at full size), a kernel-predictor-like wide output that the
# kernel splits into channel chunks, and lengths shorter than one tile, not a multiple of it, and dilated windows
# longer than the input
@pytest.mark.parametrize("c_in,c_out,k,d,t,bsz,slope,bias", [
    (32, 32, 3, 1, 1000, 1, 0.2, True),
    (32, 32, 3, 27, 500, 2, None, True),
    (16, 16, 3, 3, 37, 2, 0.1, True),
    (32, 64, 3, 9, 8, 1, None, False),
    (64, 512, 3, 1, 53, 1, None, True),
    (100, 64, 5, 1, 7, 2, 0.2, True),
])
def test_conv1d_matches_torch(cpu, c_in, c_out, k, d, t, bsz, slope, bias):
    if c_out % VW:
        pytest.skip(f"{c_out} channels: not a multiple of the vector width {VW}")
    rng = np.random.default_rng(c_in + d + t)
    x = rng.standard_normal((bsz, c_in, t)).astype(np.float32)
    w = (rng.standard_normal((c_out, c_in, k)) * 0.2).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32) if bias else None
    ref = torch.nn.functional.conv1d(torch.from_numpy(x), torch.from_numpy(w), None if b is None else
                                     torch.from_numpy(b), padding=d * (k - 1) // 2, dilation=d)
    if slope is not None:
        ref = torch.nn.functional.leaky_relu(ref, slope)
    ref = ref.numpy()
    got = _conv(cpu, x, w, b, d, slope)
    assert np.abs(ref).max() > 1
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("c_in,c,hop,segments,bsz", [(32, 32, 256, 4, 1), (16, 16, 8, 5, 2), (32, 32, 64, 3, 2)])
def test_lvc_gated_matches_reference(cpu, c_in, c, hop, segments, bsz):
    from tortoise.models.vocoder import LVCBlock
    if (2 * c) % VW:
        pytest.skip(f"{2 * c} channels: not a multiple of the vector width {VW}")
    rng = np.random.default_rng(hop)
    k = 3
    x = rng.standard_normal((bsz, c_in, segments * hop)).astype(np.float32)
    kern = (rng.standard_normal((bsz, c_in, 2 * c, k, segments)) * 0.2).astype(np.float32)
    bias = rng.standard_normal((bsz, 2 * c, segments)).astype(np.float32)
    res = rng.standard_normal((bsz, c, segments * hop)).astype(np.float32)
    with torch.no_grad():
        o = LVCBlock.location_variable_convolution(None, torch.from_numpy(x), torch.from_numpy(kern),
                                                   torch.from_numpy(bias), 1, hop)
        ref = (torch.from_numpy(res) + torch.sigmoid(o[:, :c]) * torch.tanh(o[:, c:])).numpy()
    ctx = pg.Context()
    xt = ctx.new_tensor("f32", (c_in, segments * hop, bsz)).set_input()
    kt = ctx.new_tensor("f32", (2 * c, c_in * k, segments, bsz)).set_input()
    bt = ctx.new_tensor("f32", (2 * c, 1, segments, bsz)).set_input()
    rt = ctx.new_tensor("f32", (c, segments * hop, bsz)).set_input()
    y = kernels.lvc_gated(ctx, xt, kt, bt, rt, k, hop)
    cpu.compute(pg.Graph(ctx, y), {
        xt: x.transpose(0, 2, 1),
        kt: kern.transpose(0, 4, 3, 1, 2).reshape(bsz, segments, k * c_in, 2 * c),  # (j, i, o), o fastest
        bt: bias.transpose(0, 2, 1)[:, :, None, :],
        rt: res.transpose(0, 2, 1)})
    got = y.get().reshape(bsz, segments * hop, c).transpose(0, 2, 1)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)


def _transformed_vs_torch(cpu, c_in, c_out, k, d, t, bsz, leaky_in, leaky_out, bias, residual, seed, slots, weights,
                          conv):
    """One transformed convolution (``conv(ctx, x, w, b, leaky_in, leaky_out, residual)``, weights prepared by
    ``weights``, ne (2*C_out, C_in, slots)) against torch's conv1d with the same activations: (ours, torch's)."""
    if c_out % VW or c_in % VW:
        pytest.skip(f"{c_in}/{c_out} channels: not multiples of the vector width {VW}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((bsz, c_in, t)).astype(np.float32)
    w = (rng.standard_normal((c_out, c_in, k)) / np.sqrt(c_in * k)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32) if bias else None
    r = rng.standard_normal((bsz, c_out, t)).astype(np.float32) if residual else None
    xi = torch.from_numpy(x)
    if leaky_in is not None:
        xi = torch.nn.functional.leaky_relu(xi, leaky_in)
    ref = torch.nn.functional.conv1d(xi, torch.from_numpy(w), None if b is None else torch.from_numpy(b),
                                     padding=d * (k - 1) // 2, dilation=d)
    if leaky_out is not None:
        ref = torch.nn.functional.leaky_relu(ref, leaky_out)
    ref = ref.numpy() + (r if residual else 0)
    ctx = pg.Context()
    xt = ctx.new_tensor("f32", (c_in, t, bsz)).set_input()
    wt = ctx.new_tensor("f32", (2 * c_out, c_in, slots)).set_input()
    bt = ctx.new_tensor("f32", (c_out,)).set_input() if bias else None
    rt = ctx.new_tensor("f32", (c_out, t, bsz)).set_input() if residual else None
    y = conv(ctx, xt, wt, bt, leaky_in, leaky_out, rt)
    feed = {xt: x.transpose(0, 2, 1), wt: weights(w)}
    if bias:
        feed[bt] = b
    if residual:
        feed[rt] = r.transpose(0, 2, 1)
    cpu.compute(pg.Graph(ctx, y), feed)
    got = y.get().reshape(bsz, t, c_out).transpose(0, 2, 1)
    assert np.abs(ref).max() > 1
    return got, ref


# HiFi-GAN's residual-block convolutions (7 and 11 taps, dilations 1/3/5) and its channel counts, a length shorter
# than one block, a phase count that leaves an odd number of blocks (the padding block), a dilated span longer than
# the input, more outputs than inputs, and each epilogue: input and output leaky ReLU, no bias, a residual
@pytest.mark.parametrize("c_in,c_out,k,d,t,bsz,leaky_in,leaky_out,bias,residual", [
    (32, 32, 11, 5, 1000, 1, 0.1, 0.1, True, False),
    (64, 64, 7, 3, 333, 2, None, None, True, True),
    (16, 16, 11, 1, 9, 1, 0.1, None, True, True),
    (256, 256, 7, 1, 61, 1, None, 0.1, False, False),
    (16, 48, 5, 9, 40, 3, 0.2, None, True, False),
    (32, 32, 15, 5, 23, 1, None, None, True, True),
])
def test_spectral_conv1d_matches_torch(cpu, c_in, c_out, k, d, t, bsz, leaky_in, leaky_out, bias, residual):
    n = kernels.SPECTRAL_SIZE
    got, ref = _transformed_vs_torch(
        cpu, c_in, c_out, k, d, t, bsz, leaky_in, leaky_out, bias, residual, c_in + d + t, n // 2,
        lambda w: kernels.spectral_weights(w, n),
        lambda ctx, x, w, b, li, lo, r: kernels.spectral_conv1d(ctx, x, w, b, k, d, n, li, lo, r))
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


# Winograd F(4,3) for the 3-tap convolutions: the same cases as the FFT path's, at 3 taps
@pytest.mark.parametrize("c_in,c_out,d,t,bsz,leaky_in,leaky_out,bias,residual", [
    (32, 32, 5, 1000, 1, 0.1, 0.1, True, False),
    (64, 64, 3, 333, 2, None, None, True, True),
    (16, 16, 1, 9, 1, 0.1, None, True, True),
    (256, 256, 1, 61, 1, None, 0.1, False, False),
    (16, 48, 9, 40, 3, 0.2, None, True, False),
    (128, 128, 1, 2, 1, 0.1, 0.1, True, True),
])
def test_winograd_conv1d_matches_torch(cpu, c_in, c_out, d, t, bsz, leaky_in, leaky_out, bias, residual):
    got, ref = _transformed_vs_torch(
        cpu, c_in, c_out, 3, d, t, bsz, leaky_in, leaky_out, bias, residual, c_in + d + t + 1, 3,
        kernels.winograd_weights,
        lambda ctx, x, w, b, li, lo, r: kernels.winograd_conv1d(ctx, x, w, b, d, li, lo, r))
    # F(4,3)'s transforms scale rounding up a little: measured up to 2.2e-6 of the peak at 256 channels
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-6 * np.abs(ref).max())


def test_spectral_bad_shapes_are_python_errors():
    ctx = pg.Context()
    x = ctx.new_tensor("f32", (32, 100, 1))
    w = ctx.new_tensor("f32", (64, 32, kernels.SPECTRAL_SIZE // 2))
    with pytest.raises(pg.ShapeError, match="weight must be contiguous F32"):
        kernels.spectral_conv1d(ctx, x, ctx.new_tensor("f32", (64, 16, 16)), None, 7)
    with pytest.raises(pg.ShapeError, match="odd taps"):
        kernels.spectral_conv1d(ctx, x, w, None, 8)
    with pytest.raises(pg.ShapeError, match="odd taps"):
        kernels.spectral_conv1d(ctx, x, w, None, 17)
    with pytest.raises(pg.ShapeError, match="residual must be"):
        kernels.spectral_conv1d(ctx, x, w, None, 7, residual=ctx.new_tensor("f32", (32, 99, 1)))
    with pytest.raises(pg.ShapeError, match="taps do not fit"):
        kernels.spectral_weights(np.zeros((4, 4, 40)), 32)
    for n in (24, 128):  # not a power of 2; past the kernel's FFT buffers
        with pytest.raises(pg.ShapeError, match="a power of 2 up to 64"):
            kernels.spectral_conv1d(ctx, x, ctx.new_tensor("f32", (64, 32, n // 2)), None, 7, n=n)
    with pytest.raises(pg.ShapeError, match=r"winograd_conv1d: weight must be contiguous F32 ne \(2\*C_out, 32, 3\)"):
        kernels.winograd_conv1d(ctx, x, w, None)
    with pytest.raises(pg.ShapeError, match="3-tap weight"):
        kernels.winograd_weights(np.zeros((4, 4, 5)))


def test_bad_shapes_are_python_errors():
    ctx = pg.Context()
    x = ctx.new_tensor("f32", (32, 100, 1))
    with pytest.raises(pg.ShapeError, match="weight must be contiguous F32"):
        kernels.conv1d(ctx, x, ctx.new_tensor("f32", (32, 95)), None, 3)
    with pytest.raises(pg.ShapeError, match="input must be F32 time-major"):
        kernels.conv1d(ctx, ctx.new_tensor("f16", (32, 100, 1)), ctx.new_tensor("f32", (32, 96)), None, 3)
    with pytest.raises(pg.ShapeError, match="bias must be contiguous"):
        kernels.conv1d(ctx, x, ctx.new_tensor("f32", (32, 96)), ctx.new_tensor("f32", (16,)), 3)
    kern = ctx.new_tensor("f32", (64, 96, 4, 1))
    bias = ctx.new_tensor("f32", (64, 1, 4, 1))
    with pytest.raises(pg.ShapeError, match="do not cover"):
        kernels.lvc_gated(ctx, x, kern, bias, ctx.new_tensor("f32", (32, 100, 1)), 3, 32)
    x256 = ctx.new_tensor("f32", (32, 128, 1))
    with pytest.raises(pg.ShapeError, match="residual must be"):
        kernels.lvc_gated(ctx, x256, kern, bias, ctx.new_tensor("f32", (16, 128, 1)), 3, 32)


def test_usable_only_on_cpu_and_whole_vectors():
    class Cuda:
        kind = "cuda"
    cpu = pg.Backend("cpu", threads=1)
    assert kernels.usable(cpu, VW, 2 * VW)
    assert not kernels.usable(cpu, VW + 1)
    assert not kernels.usable(Cuda(), VW)


@pytest.mark.parametrize("rows,heads,d,n,shared", [(1, 16, 64, 40, 0), (3, 4, 32, 17, 0), (16, 2, 64, 5, 0),
                                                   (3, 4, 32, 17, 9), (16, 2, 64, 30, 30), (2, 16, 64, 40, 1),
                                                   (1, 80, 32, 9, 0)])
def test_attend_cache_matches_softmax_attention(cpu, rows, heads, d, n, shared):
    """One query per row and head over a cache view (heads side by side per position, as KVCache lays them out),
    positions masked out anywhere (not only past the end), more threads than rows (each row's positions split in
    chunks whose softmax partials are merged). With ``shared`` the first positions are read from row 0 for every
    row: the other rows hold garbage there, which must not count."""
    _attend_case(cpu, rows, heads, d, n, shared)


def test_attend_cache_more_threads_than_positions():
    """4 threads for one row of 3 valid positions: 4 chunks, one of them empty, which the merge must skip."""
    _attend_case(pg.Backend("cpu", threads=4), 1, 4, 32, 4, 0)


def _attend_case(cpu, rows, heads, d, n, shared):
    if d % VW:
        pytest.skip(f"head size {d}: not a multiple of the vector width {VW}")
    rng = np.random.default_rng(rows + n)
    e, cap = heads * d, n + 7
    kc = rng.standard_normal((rows, cap, e)).astype(np.float32)
    vc = rng.standard_normal((rows, cap, e)).astype(np.float32)
    q = rng.standard_normal((rows, heads, 1, d)).astype(np.float32)
    mask = np.full((1, cap), -np.inf, np.float16)
    mask[0, :n] = 0
    mask[0, n // 2] = -np.inf
    mask[0, 1] = -0.5
    ctx = pg.Context()
    kt, vt = (ctx.new_tensor("f32", (e, cap, rows)).set_input() for _ in range(2))
    qt = ctx.new_tensor("f32", (d, 1, heads, rows)).set_input()
    mt = ctx.new_tensor("f16", (cap, 1)).set_input()
    st = ctx.new_tensor("i32", (1,)).set_input()
    def view(t):
        return ctx.view(t, (d, cap, heads, rows), (e * 4, d * 4, e * cap * 4))
    y = kernels.attend_cache(ctx, qt, view(kt), view(vt), mt, 0.125, st if shared else None)
    given_k, given_v = kc.copy(), vc.copy()
    if shared:
        kc[1:, :shared], vc[1:, :shared] = kc[:1, :shared], vc[:1, :shared]   # what the rows mean
        given_k[1:, :shared], given_v[1:, :shared] = np.nan, np.nan           # what they hold
    feed = {kt: given_k, vt: given_v, qt: q, mt: mask}
    if shared:
        feed[st] = np.array([shared], np.int32)
    cpu.compute(pg.Graph(ctx, y), feed)
    got = y.get().reshape(rows, heads, d)
    k4 = kc.reshape(rows, cap, heads, d).transpose(0, 2, 1, 3)            # (rows, heads, cap, d)
    v4 = vc.reshape(rows, cap, heads, d).transpose(0, 2, 1, 3)
    s = np.einsum("rhd,rhcd->rhc", q[:, :, 0].astype(np.float64), k4) * 0.125 + mask[0].astype(np.float64)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("rhc,rhcd->rhd", p / p.sum(-1, keepdims=True), v4)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
    with pytest.raises(pg.ShapeError, match=f"at most {16 * VW}"):
        wide = ctx.new_tensor("f32", (17 * VW, 1, 1, 1))
        kv = ctx.new_tensor("f32", (17 * VW, cap, 1, 1))
        kernels.attend_cache(ctx, wide, kv, kv, mt, 0.125)


@pytest.mark.parametrize("inplace", [False, True], ids=["new", "inplace"])
@pytest.mark.parametrize("n,pad,heads,batch", [(87, 9, 4, 2), (16, 0, 2, 1), (5, 11, 3, 1)])
def test_relpos_softmax_matches_masked_softmax(cpu, n, pad, heads, batch, inplace):
    """Softmax over n keys of scale * scores + table[j - i + n - 1, h], zeros for the padding keys after them
    (in place: the weights written over the scores)."""
    rng = np.random.default_rng(n)
    k = n + pad
    scores = rng.standard_normal((batch, heads, n, k)).astype(np.float32) * 3
    table = rng.standard_normal((heads, 2 * n - 1)).astype(np.float32)
    ctx = pg.Context()
    st = ctx.new_tensor("f32", (k, n, heads, batch)).set_input()
    tt = ctx.new_tensor("f32", (2 * n - 1, heads)).set_input()
    y = kernels.relpos_softmax(ctx, st, tt, n, 0.125, inplace=inplace)
    cpu.compute(pg.Graph(ctx, y), {st: scores, tt: table})
    got = y.get().reshape(batch, heads, n, k)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    logits = scores[..., :n].astype(np.float64) * 0.125 + table[:, j - i + n - 1][None]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(got[..., :n], p / p.sum(-1, keepdims=True), rtol=0, atol=1e-6)
    assert not got[..., n:].any()
    with pytest.raises(pg.ShapeError, match="table must be"):
        kernels.relpos_softmax(ctx, st, ctx.new_tensor("f32", (2 * n, heads)), n, 0.125)
