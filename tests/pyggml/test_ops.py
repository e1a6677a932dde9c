"""pyggml ops against numpy references, for every op the Tortoise graphs use (CPU backend)."""
import math

import numpy as np
import pytest

import pyggml as pg
import pyggml.raw  # noqa: F401

RNG = np.random.default_rng(0)


def run(backend, build, *arrays, types=None):
    """Build a graph over ``arrays`` (numpy, as graph inputs) with ``build(ctx, *tensors)``; return its outputs."""
    ctx = pg.Context()
    types = types or [None] * len(arrays)
    ins = [ctx.from_numpy(a, type=t).set_input() for a, t in zip(arrays, types)]
    outs = build(ctx, *ins)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    g = pg.Graph(ctx, *outs)
    backend.compute(g, dict(zip(ins, arrays)))
    res = [o.get() for o in outs]
    return res if len(res) > 1 else res[0]


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_mul_mat(backend):
    w, x = randn(7, 33), randn(2, 5, 33)
    np.testing.assert_allclose(run(backend, lambda c, a, b: c.mul_mat(a, b), w, x), x @ w.T, rtol=1e-5, atol=1e-5)


def test_mul_mat_broadcasts_over_batch(backend):
    a, b = randn(3, 4, 16), randn(2, 3, 4, 16)   # a broadcasts over b's outer dim
    np.testing.assert_allclose(run(backend, lambda c, p, q: c.mul_mat(p, q), a, b), b @ np.swapaxes(a, -1, -2),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wtype,tol", [("f16", 2e-2), ("q8_0", 5e-2)])
def test_mul_mat_quantized_weights(backend, wtype, tol):
    w, x = randn(8, 64), randn(3, 64)
    ctx = pg.Context()
    wt = ctx.new_tensor(wtype, (64, 8))
    buf = backend.alloc_tensors(ctx)
    if wtype == "f16":
        wt.set(w.astype(np.float16))
    else:
        gguf = pytest.importorskip("gguf")
        wt.set(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0))
    g = pg.Context()
    xt = g.from_numpy(x).set_input()
    y = g.mul_mat(wt, xt)
    backend.compute(pg.Graph(g, y), {xt: x})
    np.testing.assert_allclose(y.get(), x @ w.T, atol=tol * 8)
    del buf


def test_add_mul_broadcast(backend):
    a, b, s = randn(3, 4, 5), randn(1, 4, 1), randn(5)
    out = run(backend, lambda c, x, y, z: (c.add(x, y), c.mul(x, z), c.sub(x, y), c.div(x, c.exp(z))), a, b, s)
    np.testing.assert_allclose(out[0], a + b, rtol=1e-6)
    np.testing.assert_allclose(out[1], a * s, rtol=1e-6)
    np.testing.assert_allclose(out[2], a - b, rtol=1e-6)
    np.testing.assert_allclose(out[3], a / np.exp(s), rtol=1e-5)


def test_norm_and_rms_norm(backend):
    x = randn(4, 6, 64) * 3 + 1
    n, r = run(backend, lambda c, t: (c.norm(t, 1e-5), c.rms_norm(t, 1e-6)), x)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(n, (x - mu) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r, x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6), rtol=1e-4, atol=1e-4)


def test_group_norm(backend):
    b, ch, t, groups = 2, 8, 10, 4
    x = randn(b, ch, 1, t) * 2 + 0.5     # ne (T, 1, C, B): groups split ne[2]
    y = run(backend, lambda c, a: c.group_norm(a, groups, 1e-5), x)
    g = x.reshape(b, groups, -1)
    ref = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_soft_max_ext_with_mask(backend):
    x = randn(2, 3, 5, 7)
    mask = np.where(RNG.random((5, 7)) < 0.3, -np.inf, 0).astype(np.float32)
    mask[:, 0] = 0   # every row keeps one entry
    y = run(backend, lambda c, a, m: c.soft_max_ext(a, m, 0.5), x, mask)
    z = x * 0.5 + mask
    ref = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(y, ref / ref.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_get_rows(backend):
    table, ids = randn(10, 6), np.array([3, 0, 9, 3], dtype=np.int32)
    np.testing.assert_array_equal(run(backend, lambda c, t, i: c.get_rows(t, i), table, ids), table[ids])


@pytest.mark.parametrize("dim", [0, 1, 2, 3])
def test_concat(backend, dim):
    shape_a, shape_b = [2, 3, 4, 5], [2, 3, 4, 5]
    shape_b[3 - dim] = 2          # numpy axis of ggml dim
    a, b = randn(*shape_a), randn(*shape_b)
    np.testing.assert_array_equal(run(backend, lambda c, x, y: c.concat(x, y, dim), a, b),
                                  np.concatenate([a, b], axis=3 - dim))


def test_concat_of_permuted_views(backend):
    a, b = randn(3, 4, 5), randn(3, 4, 5)
    out = run(backend, lambda c, x, y: c.concat(c.permute(x, 1, 0, 2, 3), c.permute(y, 1, 0, 2, 3), 1), a, b)
    np.testing.assert_array_equal(out, np.concatenate([np.swapaxes(a, 1, 2), np.swapaxes(b, 1, 2)], axis=1))


def conv1d_ref(x, w, stride=1, pad=0, dil=1):
    """torch.nn.functional.conv1d in numpy: x (B, Cin, T), w (Cout, Cin, K)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad)))
    k = w.shape[-1]
    t_out = (x.shape[-1] - dil * (k - 1) - 1) // stride + 1
    cols = np.stack([x[:, :, i * stride: i * stride + dil * (k - 1) + 1: dil] for i in range(t_out)], axis=2)
    return np.einsum("bctk,ock->bot", cols, w)


def test_im2col_matches_conv1d(backend):
    x, w = randn(2, 3, 20), randn(4, 3, 5)

    def build(c, xt, wt):
        cols = c.im2col(wt, xt, 2, 0, 3, 0, 2, 0, False)          # ne (K*Cin, T_out, B)
        return c.cont(c.transpose(c.mul_mat(c.reshape(wt, 15, 4), cols)))
    np.testing.assert_allclose(run(backend, build, x, w), conv1d_ref(x, w, 2, 3, 2), rtol=1e-5, atol=1e-5)


def test_conv_transpose_1d(backend):
    x, w, s = randn(3, 9), randn(3, 2, 4), 2          # x (Cin, T), w (Cin, Cout, K)
    y = run(backend, lambda c, xt, wt: c.conv_transpose_1d(wt, xt, s), x, w)
    ref = np.zeros((2, (9 - 1) * s + 4), np.float32)
    for t in range(9):
        ref[:, t * s: t * s + 4] += np.einsum("i,iok->ok", x[:, t], w)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_pad_reflect_1d(backend):
    x = randn(2, 3, 10)
    np.testing.assert_array_equal(run(backend, lambda c, a: c.pad_reflect_1d(a, 3, 2), x),
                                  np.pad(x, ((0, 0), (0, 0), (3, 2)), mode="reflect"))


def test_leaky_relu_gelu_tanh_sigmoid(backend):
    x = randn(4, 50) * 3
    lr, ge, gerf, th, sg = run(backend, lambda c, a: (c.leaky_relu(a, 0.2), c.gelu(a), c.gelu_erf(a), c.tanh(a),
                                                   c.sigmoid(a)), x)
    np.testing.assert_allclose(lr, np.where(x > 0, x, 0.2 * x), rtol=1e-6)
    ref_gelu = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(ge, ref_gelu, rtol=1e-5, atol=1e-6)   # exact, not ggml's F16 table (patch 0002)
    erf = np.vectorize(math.erf)
    np.testing.assert_allclose(gerf, 0.5 * x * (1 + erf(x / math.sqrt(2))), atol=1e-5)
    np.testing.assert_allclose(th, np.tanh(x), atol=1e-6)
    np.testing.assert_allclose(sg, 1 / (1 + np.exp(-x)), atol=1e-6)


def test_custom_op_calls_c_function_per_thread():
    """Context.custom (ggml_custom_4d): the function sees its arguments as dst->src and splits rows by ith/nth."""
    from pyggml.raw import ffi

    @ffi.callback("ggml_custom_op_t")
    def twice_plus(dst, ith, nth, userdata):
        a, b = dst.src[0], dst.src[1]
        n, rows = dst.ne[0], dst.ne[1]
        pa, pb, pd = (ffi.cast("float *", t.data) for t in (a, b, dst))
        k = ffi.cast("float *", userdata)[0]
        for r in range(ith, rows, nth):
            for i in range(n):
                pd[r * n + i] = k * pa[r * n + i] + pb[i]

    be = pg.Backend("cpu", threads=2)
    k = ffi.new("float *", 2.0)
    ctx = pg.Context()
    a = ctx.new_tensor("f32", (5, 3)).set_input()
    b = ctx.new_tensor("f32", (5,)).set_input()
    y = ctx.custom(twice_plus, [a, b], (5, 3), userdata=k)
    assert y.ne == (5, 3, 1, 1) and y.op == "CUSTOM"
    xa, xb = np.arange(15, dtype=np.float32).reshape(3, 5), np.arange(5, dtype=np.float32) * 10
    be.compute(pg.Graph(ctx, y), {a: xa, b: xb})
    np.testing.assert_array_equal(y.get(), 2 * xa + xb)
    with pytest.raises(pg.ShapeError, match="bad shape"):
        ctx.custom(twice_plus, [a], (0, 3))


def test_timestep_embedding(backend):
    t, dim = np.array([0.0, 1.0, 250.0, 999.0], dtype=np.float32), 16
    y = run(backend, lambda c, a: c.timestep_embedding(a, dim), t)
    freqs = np.exp(-math.log(10000) * np.arange(dim // 2) / (dim // 2))
    args = t[:, None] * freqs[None]
    np.testing.assert_allclose(y, np.concatenate([np.cos(args), np.sin(args)], -1), rtol=1e-4, atol=1e-4)


def attention_ref(q, k, v, mask, scale):
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale + mask
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v)


def test_flash_attn_ext(backend):
    b, h, tq, tk, d = 2, 3, 5, 7, 16
    q, k, v = randn(b, h, tq, d), randn(b, h, tk, d), randn(b, h, tk, d)
    mask = np.zeros((tq, tk), np.float32)
    mask[np.triu_indices(tq, tk - tq + 1)] = -np.inf    # causal, queries at the end
    out = run(backend, lambda c, qt, kt, vt, m: c.flash_attn_ext(qt, kt, vt, m, 0.25), q, k, v, mask.astype(np.float16),
              types=[None, None, None, "f16"])
    # ggml's result ne (D, H, T_q, B) = numpy (B, T_q, H, D)
    ref = attention_ref(q, k, v, mask, 0.25).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)


# -- graph print and DOT ---------------------------------------------------------------------------------------
def test_graph_print_returns_and_prints(capsys):
    ctx = pg.Context()
    a = ctx.new_tensor("f32", (4, 3), "weights")
    y = ctx.gelu(ctx.mul_mat(a, ctx.new_tensor("f32", (4, 2), "x")))
    g = pg.Graph(ctx, y)
    text = g.print()
    printed = capsys.readouterr().out
    assert text == printed
    assert "n_nodes = 2" in text and "MUL_MAT" in text and "UNARY" in text and "weights" in text
    assert str(g) == text


def test_graph_dot_export(tmp_path):
    ctx = pg.Context()
    y = ctx.add(ctx.new_tensor("f32", (4,), "lhs"), ctx.new_tensor("f32", (4,), "rhs"))
    path = tmp_path / "g.dot"
    text = pg.Graph(ctx, y).to_dot(path)
    assert text.startswith("digraph") and "lhs" in text and "rhs" in text
    assert path.read_text() == text


def test_ggml_logs_reach_python_logging(caplog):
    ctx = pg.Context()
    g = pg.Graph(ctx, ctx.scale(ctx.new_tensor("f32", (2,)), 2.0))
    with caplog.at_level("INFO", logger="pyggml.ggml"):
        import pyggml.raw as raw
        raw.lib.ggml_graph_print(g.ptr)
    assert any("n_nodes = 1" in r.getMessage() for r in caplog.records)


# -- bad input becomes Python exceptions, never an abort --------------------------------------------------------
def test_bad_shapes_raise():
    ctx = pg.Context()
    a, b = ctx.new_tensor("f32", (4, 3)), ctx.new_tensor("f32", (5, 3))
    with pytest.raises(pg.ShapeError, match="inner dims"):
        ctx.mul_mat(a, b)
    with pytest.raises(pg.ShapeError, match="broadcast"):
        ctx.add(a, b)
    with pytest.raises(pg.ShapeError, match="concat"):
        ctx.concat(a, ctx.new_tensor("f32", (5, 4)), 1)
    with pytest.raises(pg.ShapeError, match="elements"):
        ctx.reshape(a, 5, 2)
    with pytest.raises(pg.ShapeError, match="I32"):
        ctx.get_rows(a, ctx.new_tensor("f32", (2,)))
    with pytest.raises(pg.ShapeError, match="groups"):
        ctx.group_norm(ctx.new_tensor("f32", (4, 1, 6)), 4, 1e-5)
    with pytest.raises(pg.ShapeError, match="p0=0"):
        ctx.conv_transpose_1d(ctx.new_tensor("f32", (3, 2, 4)), ctx.new_tensor("f32", (9, 4)), 2, p0=1)
    with pytest.raises(pg.ShapeError, match="shorter"):
        ctx.pad_reflect_1d(a, 4, 0)
    with pytest.raises(TypeError):
        ctx.add(a, np.zeros(3))


def test_bad_data_raises(backend):
    ctx = pg.Context()
    t = ctx.new_tensor("f32", (4, 3))
    with pytest.raises(pg.GGMLError, match="no memory"):
        t.set(np.zeros((3, 4), np.float32))
    buf = backend.alloc_tensors(ctx)
    with pytest.raises(pg.ShapeError, match="does not fit"):
        t.set(np.zeros((4, 3), np.float32))
    t.set(np.ones((3, 4), np.float32))
    assert t.get().sum() == 12
    del buf


def test_compute_checks_inputs(backend):
    ctx = pg.Context()
    x = ctx.new_tensor("f32", (4,))          # not marked as input
    with pytest.raises(pg.GGMLError, match="not marked as a graph input"):
        backend.compute(pg.Graph(ctx, ctx.scale(x, 2.0)), {x: np.zeros(4, np.float32)})
    x.set_input()
    weight = pg.Context().new_tensor("f32", (4,), "forgotten")   # never allocated
    with pytest.raises(pg.GGMLError, match="forgotten.*has no memory"):
        backend.compute(pg.Graph(ctx, ctx.add(ctx.scale(x, 2.0), weight)), {x: np.zeros(4, np.float32)})


def test_context_limits():
    small = pg.Context(mem_size=3 * pg.raw.lib.ggml_tensor_overhead())
    small.new_tensor("f32", (1,))
    with pytest.raises(pg.OutOfContextMemory):
        for _ in range(10):
            small.new_tensor("f32", (1,))
    with pytest.raises(pg.ShapeError):
        pg.Context().new_tensor("q8_0", (31,))      # not a whole block
    with pytest.raises(ValueError, match="name"):
        pg.Context().new_tensor("f32", (1,), "x" * 80)


def test_unknown_backend_and_cuda_without_build():
    with pytest.raises(ValueError, match="unknown backend"):
        pg.Backend("tpu")
    if not pg.HAS_CUDA:
        with pytest.raises(pg.BackendUnavailable, match="without CUDA"):
            pg.Backend("cuda")
    with pytest.raises(ValueError, match="threads"):
        pg.Backend("cpu", threads=0)


def test_info_lists_cpu(capsys):
    from pyggml.__main__ import main
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "ggml 0.20.2" in out and "cpu" in out and "CPU" in out


def test_recomputing_a_graph_after_others_reallocated_the_buffer(backend):
    """ggml-alloc keeps the addresses of tensors that already have data: a graph computed again after another
    graph grew (reallocated) the allocator's buffer must be re-placed, not read freed memory."""
    def graph(n):
        ctx = pg.Context()
        x = ctx.new_tensor("f32", (n,)).set_input()
        y = ctx.scale(ctx.add(x, ctx.view(x, (n,))), 0.5)
        return ctx, x, y, pg.Graph(ctx, y)
    c1, x1, y1, g1 = graph(8)
    backend.compute(g1, {x1: np.arange(8, dtype=np.float32)})
    c2, x2, y2, g2 = graph(1 << 20)
    backend.compute(g2, {x2: np.ones(1 << 20, np.float32)})
    backend.compute(g1, {x1: np.arange(8, dtype=np.float32) * 3})
    np.testing.assert_array_equal(y1.get(), np.arange(8, dtype=np.float32) * 3)
    backend.compute(g2, {x2: np.full(1 << 20, 2, np.float32)})
    assert (y2.get() == 2).all()


def test_importable_from_the_source_root():
    """`python -m tortoise_ggml.generate` in a checkout puts the source pyggml/ first on sys.path; the compiled
    extension lives only in the installed copy and must still be found."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", "import pyggml; print(pyggml.__file__, pyggml.version())"], cwd=root,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "0.20.2" in p.stdout
