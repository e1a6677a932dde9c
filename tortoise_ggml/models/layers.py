"""Graph blocks shared by every Tortoise model, written once: linear, norms, 1-D convolutions, attention.

Layout conventions (ggml ``ne`` order, fastest dimension first):
  * sequence data, torch (B, T, D)    -> ne (D, T, B)
  * channel data,  torch (B, C, T)    -> ne (T, C, B)   (the same memory as torch's contiguous tensor)
Weights keep torch's shapes (numpy order), so a torch Linear weight (out, in) has ne (in, out) and a Conv1d weight
(out, in, k) has ne (k, in, out).
"""
from __future__ import annotations

import math

from pyggml import Context, ShapeError, Tensor

from .. import kernels

# measured at the AR's full size (2 threads, AVX-512 VNNI), a decode step with ggml's dot products vs q8_matmul:
# batch 2 38 vs 20 ms, batch 4 52 vs 21 ms, batch 16 73 vs 31 ms; on a Zen 3 (AVX2, the product by VPMADDUBSW):
# batch 2 34 vs 32 ms, batch 4 46 vs 40 ms, batch 16 124 vs 89 ms. Up to 4 positions q8_matmul reads the weights in
# place (no repacking; one position is ggml's arithmetic, the same sums bit for bit): a step's weight matrices alone
# took 15.8-20.0 ms in ggml's mul_mat, 12.3-16.6 ms in it, and at 2 / 4 positions 19-27 / 42-45 ms against the
# panels' 38-41 / 46-50 (Zen 4, 2 threads)
Q8_MIN_COLUMNS = 1
# and for F32/F16 weights (tinyBLAS vs f32_matmul), f16 / f32 files: batch 8 44 vs 40 / 55 vs 61 ms, batch 16
# 78 vs 59 / 113 vs 77 ms, an 80-token prefill 190-200 vs 156-166 / 217-231 vs 187-225 ms
F32_MIN_COLUMNS = 16


def linear(ctx: Context, x: Tensor, w: Tensor, b: Tensor | None = None, fused: bool = False) -> Tensor:
    """torch Linear on sequence data: x ne (in, T, B) -> ne (out, T, B).

    A contiguous batch runs as one (in, T*B) product: with a 3-D operand ggml's CPU mul_mat runs one product per
    batch entry, each reading the whole weight matrix (a decode step over B rows would stream the weights B times).
    A weight in a repacked matmul layout (AMX) takes only a contiguous 2-D operand, so there x is always flattened.

    ``fused`` (the CPU, tortoise-ggml's kernels): a Q8_0 weight runs as kernels.q8_matmul (up to 4 positions, as a
    decode step of 1-4 rows, read each row in place; more are multiplied in repacked panels), an F32 or F16 one as
    kernels.f32_matmul from F32_MIN_COLUMNS.
    """
    columns = x.ne[1] * x.ne[2]
    if fused and x.type.name == "F32" and x.ne[3] == 1:
        if kernels.q8_matmul_fits(w) and columns >= Q8_MIN_COLUMNS:
            x = x if x.is_contiguous else ctx.cont(x)
            return kernels.q8_matmul(ctx, w, kernels.q8_pack(ctx, x), x.ne[0], b)
        if kernels.f32_matmul_fits(w) and w.ne[2] == 1 and columns >= F32_MIN_COLUMNS:
            return kernels.f32_matmul(ctx, w, x if x.is_contiguous else ctx.cont(x), b)
    if w.matmul_layout and not x.is_contiguous:
        x = ctx.cont(x)
    ne = x.ne
    flat = (ne[2] > 1 or ne[3] > 1) and x.is_contiguous
    y = ctx.mul_mat(w, ctx.reshape(x, ne[0], ne[1] * ne[2] * ne[3]) if flat else x)
    if b is not None:
        y = ctx.add(y, b)
    return ctx.reshape(y, y.ne[0], ne[1], ne[2], ne[3]) if flat else y


def layer_norm(ctx: Context, x: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over ne[0]."""
    y = ctx.norm(x, eps)
    if w is not None:
        y = ctx.mul(y, w)
    if b is not None:
        y = ctx.add(y, b)
    return y


def to_sequence(ctx: Context, x: Tensor) -> Tensor:
    """Channel data ne (T, C, B) <-> sequence data ne (C, T, B) (its own inverse)."""
    return ctx.cont(ctx.transpose(x))


def channel_vector(ctx: Context, v: Tensor) -> Tensor:
    """A per-channel vector (C,) as ne (1, C), to broadcast over the time axis of channel data."""
    return ctx.reshape(v, 1, v.ne[0])


def group_norm(ctx: Context, x: Tensor, w: Tensor | None, b: Tensor | None, groups: int, eps: float) -> Tensor:
    """torch GroupNorm on channel data x ne (T, C, B)."""
    t, c, n = x.ne[0], x.ne[1], x.ne[2]
    if not x.is_contiguous:
        x = ctx.cont(x)
    y = ctx.reshape(ctx.group_norm(ctx.reshape(x, t, 1, c, n), groups, eps), t, c, n)
    if w is not None:
        y = ctx.mul(y, channel_vector(ctx, w))
    if b is not None:
        y = ctx.add(y, channel_vector(ctx, b))
    return y


def conv1d(ctx: Context, x: Tensor, w: Tensor, b: Tensor | None = None, stride: int = 1, padding: int = 0,
           dilation: int = 1, kernel_size: int | None = None) -> Tensor:
    """torch Conv1d on channel data: x ne (T, C_in, B), w ne (K, C_in, C_out) -> ne (T_out, C_out, B).
    A flattened weight ne (K*C_in, C_out) (how f16/q8_0 files store large kernels) needs ``kernel_size``.

    im2col in F32 then one matrix product: ggml_conv_1d's F16 im2col would lose precision.
    """
    if kernel_size is not None and (w.ne[0], w.ne[1]) != (kernel_size, x.ne[1]):
        # flattened: a matrix, possibly quantized and in a repacked layout
        if (w.ne[0], w.ne[2], w.ne[3]) != (kernel_size * x.ne[1], 1, 1):
            raise ShapeError(f"conv1d: weight {w!r} is neither (K={kernel_size}, C_in={x.ne[1]}, C_out) nor "
                             f"flattened (K*C_in, C_out), for input {x!r}")
        k, c_in, c_out, wm = kernel_size, x.ne[1], w.ne[1], w
    else:
        k, c_in, c_out, wm = w.ne[0], w.ne[1], w.ne[2], None
    if k == 1 and stride == 1 and padding == 0:
        # a 1x1 conv is a Linear over channels: no unfold needed
        xt = ctx.cont(ctx.transpose(x))                       # ne (C_in, T, B)
        y = linear(ctx, xt, wm if wm is not None else ctx.reshape(w, c_in, c_out))   # ne (C_out, T, B)
        y = ctx.cont(ctx.transpose(y))                        # ne (T, C_out, B)
    else:
        # im2col takes the kernel's shape from its first operand and never reads it: a flattened weight lends
        # a placeholder (K, C_in)
        shape = w if wm is None else ctx.new_tensor("f32", (k, c_in)).set_input()
        cols = ctx.im2col(shape, x, stride, 0, padding, 0, dilation, 0, False)    # ne (K*C_in, T_out, B)
        if wm is None:
            wm = ctx.reshape(w if w.is_contiguous else ctx.cont(w), k * c_in, c_out)
        if cols.ne[2] == 1 and wm.type == cols.type:
            # one sample: cols^T @ W gives (T_out, C_out) directly, saving a transpose of the output
            y = ctx.mul_mat(cols, wm)
        else:
            y = ctx.cont(ctx.transpose(linear(ctx, cols, wm)))
    if b is not None:
        y = ctx.add(y, channel_vector(ctx, b))
    return y


def conv1d_time_major(ctx: Context, x: Tensor, w: Tensor, b: Tensor | None, kernel_size: int, fused: bool = False,
                      residual: Tensor | None = None) -> Tensor:
    """torch Conv1d (stride 1, padding (K-1)/2) on sequence (time-major) data: x ne (C_in, T, B) -> ne (C_out, T, B)
    (+ ``residual`` ne (C_out, T, B)). w ne (K, C_in, C_out) or flattened ne (K*C_in, C_out).

    A 1x1 convolution is a Linear over channels. ``fused`` (the CPU, tortoise-ggml's kernels): a Q8_0 weight runs
    as kernels.q8_matmul, with the columns quantized (and for K > 1 unfolded) straight from x and bias and residual
    added in the same pass; an F32 or F16 one as kernels.f32_matmul on kernels.im2col's columns. Plain ggml ops
    unfold with ggml_im2col, which reads channel-major data: one transpose.
    """
    c_in, k = x.ne[0], kernel_size
    flat = w if w.ne[0] == k * c_in and w.ne[2] == 1 else None
    if flat is None:
        if w.ne[:2] != (k, c_in):
            raise ShapeError(f"conv1d: weight {w!r} is neither (K={k}, C_in={c_in}, C_out) nor flattened "
                             f"(K*C_in, C_out), for input {x!r}")
        flat = ctx.reshape(w if w.is_contiguous else ctx.cont(w), k * c_in, w.ne[2])
    if k % 2 == 0:
        raise ShapeError(f"conv1d_time_major: kernel size {k} is even (its padding would not be symmetric)")
    if residual is not None and fused and not residual.is_contiguous:
        residual = ctx.cont(residual)
    if fused and kernels.q8_matmul_fits(flat):
        if not x.is_contiguous:
            x = ctx.cont(x)
        return kernels.q8_matmul(ctx, flat, kernels.q8_pack(ctx, x, k), k * c_in, b, residual)
    if k == 1:
        cols = x
    elif fused:
        cols = kernels.im2col(ctx, x if x.nb[0] == 4 else ctx.cont(x), k)
    else:
        shape = ctx.new_tensor("f32", (k, c_in)).set_input()   # im2col reads only the kernel's shape
        cols = ctx.im2col(shape, ctx.cont(ctx.transpose(x)), 1, 0, (k - 1) // 2, 0, 1, 0, False)
    if fused and kernels.f32_matmul_fits(flat) and cols.type.name == "F32" and cols.ne[3] == 1:
        return kernels.f32_matmul(ctx, flat, cols if cols.is_contiguous else ctx.cont(cols), b, residual)
    y = linear(ctx, cols, flat, b)
    return y if residual is None else ctx.add(y, residual)


def conv_transpose1d(ctx: Context, x: Tensor, w: Tensor, b: Tensor | None = None, stride: int = 1,
                     padding: int = 0, output_padding: int = 0) -> Tensor:
    """torch ConvTranspose1d on channel data of one sample: x ne (T, C_in), w (torch (C_in, C_out, K)) ne
    (K, C_out, C_in) -> ne (T_out, C_out) with T_out = (T-1)*stride - 2*padding + K + output_padding.

    ggml computes the unpadded result; torch's padding crops ``padding`` samples from each end.
    """
    full = ctx.conv_transpose_1d(w, x, stride)                # ne ((T-1)*s + K, C_out)
    t_out = (x.ne[0] - 1) * stride - 2 * padding + w.ne[0] + output_padding
    if padding or output_padding:
        if output_padding > padding:
            full = ctx.pad(full, output_padding - padding)
        full = ctx.view(full, (t_out, full.ne[1]), offset=padding * full.nb[0])
        full = ctx.cont(full)
    if b is not None:
        full = ctx.add(full, channel_vector(ctx, b))
    return full


def attention(ctx: Context, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
              scale: float | None = None) -> Tensor:
    """softmax(scale q k^T + mask) v with heads: q ne (D, T_q, H, B), k/v ne (D, T_kv, H, B) (any strides).

    Returns ne (D*H, T_q, B): heads concatenated per position, as torch's merge-heads gives.
    ``mask``: F16 ne (T_kv, T_q padded, 1|H, 1|B) with 0 / -inf, as ggml_flash_attn_ext takes it.
    """
    d, h, tq, n = q.ne[0], q.ne[2], q.ne[1], q.ne[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = ctx.flash_attn_ext(q, k, v, mask, scale)            # ne (D, H, T_q, B)
    return ctx.reshape(out, d * h, tq, n)


def split_heads(ctx: Context, x: Tensor, heads: int) -> Tensor:
    """ne (H*D, T, B) -> a view ne (D, T, H, B)."""
    hd, t, n = x.ne[0], x.ne[1], x.ne[2]
    return ctx.permute(ctx.reshape(x if x.is_contiguous else ctx.cont(x), hd // heads, heads, t, n), 0, 2, 1, 3)
