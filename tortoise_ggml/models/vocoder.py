"""UnivNet c32 generator (tortoise/models/vocoder.py) as one ggml graph: mel (B, 100, T) -> 24 kHz waveform.

Same blocks, names and order as the reference: KernelPredictor, LVCBlock (with location_variable_convolution),
UnivNetGenerator (forward, inference).

Layout. The reference keeps (B, C, T) tensors; here the generator's audio path runs in "time-major" layout, ggml
ne (C, T, B) (numpy (B, T, C)), where the C channels of one sample are adjacent. In that layout a convolution window
of K samples is K*C adjacent floats, so the location-variable convolution of one hop segment is a single
mul_mat of the segment's own predicted (C_in*K, C_out) kernel with an overlapping strided view of the input: no
unfold copy, and mul_mat broadcasts over the segments (ne[2]) and the batch (ne[3]). The kernel predictor works on
mel frames in the reference layout ne (T, C, B) with the shared im2col convolution, and its last convolution
produces each frame's kernels directly in the order that mul_mat wants (its output channels are permuted, which is
the same as permuting its weight rows). The transposed convolution is one mul_mat too, and conv_post's reflect
padding touches only the two ends.

Speed on CPU hangs on mul_mat: see ``windows_for`` for how windows are shaped for tinyBLAS or ggml's dot product.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import pyggml as pg
from pyggml import Context, Tensor
from pyggml.raw import lib

from .. import kernels as fused_kernels
from ..utils.checks import as_generator, floats
from . import layers
from .arch_util import ModuleWeights
from .base import Model

# the value the reference appends to the mel (log of ~1e-5: silence) so the last frames do not end in an artifact
PAD_VALUE = -11.5129
PAD_FRAMES = 10


# ------------------------------------------------------------------------------------------------------------------
# time-major building blocks: x ne (C, T, B)
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Windows:
    """How a convolution's windows meet mul_mat on one backend: ``step``, the multiple of floats the contraction
    (taps*channels) is widened to with zero-weighted extra taps, and ``contiguous``, whether the windows are copied
    out (im2col-like) or read through an overlapping view."""
    step: int
    contiguous: bool


# tinyBLAS splits every product of a batched mul_mat across all threads, with two barriers per product: for the
# location-variable convolution's thousands of small products that waiting costs more than the products as soon as
# the machine is busy. tortoise-ggml's sgemm batching patch gives each thread whole products instead, and says so.
SGEMM_SPLITS_BATCHES = hasattr(lib, "ggml_cpu_has_llamafile_batched") and bool(lib.ggml_cpu_has_llamafile_batched())


def windows_for(backend: pg.Backend, rows: int, batched: bool = False) -> Windows:
    """The window rules for a mul_mat with ``rows`` output rows (src0 rows) on ``backend``; ``batched``: one
    product per segment (the location-variable convolution).

    On CPU, ggml's F32 mul_mat goes to tinyBLAS (llamafile sgemm, when built in) for row counts that are a multiple
    of 4 and contiguous src1 only, and needs the contraction to be a multiple of its vector width (16 floats at
    most): such windows are copied out, which costs far less than the other path. That other path, ggml's own dot
    product, steps through 64 floats at a time on AVX-512 (32 on AVX2, 16 on NEON) and sums any remainder one float
    at a time, slower than a few extra zero taps; it reads overlapping views as they are, and runs a batch of
    products as one parallel loop (see SGEMM_SPLITS_BATCHES). GPUs take any layout.
    """
    if backend.kind != "cpu":
        return Windows(1, False)
    sgemm = lib.ggml_cpu_has_llamafile() and rows % 4 == 0
    if sgemm and batched and (backend.threads or 1) > 1 and not SGEMM_SPLITS_BATCHES:
        sgemm = False
    return Windows(16, True) if sgemm else Windows(64, False)


def taps_for(k: int, channels: int, step: int) -> int:
    """Taps to compute for a k-tap convolution over ``channels``: k, or up to 2k when that makes taps*channels a
    multiple of ``step`` (the extra taps get zero weights)."""
    for taps in range(k, 2 * k + 1):
        if taps * channels % step == 0:
            return taps
    return k


def _windows(ctx: Context, xp: Tensor, taps: int, dilation: int, t_out: int, contiguous: bool = False) -> Tensor:
    """The convolution windows of padded time-major ``xp`` ne (C, T_pad, B) as ne (C*taps, t_out, B): element
    j*C + i = channel i at tap j. With dilation 1 the windows overlap in memory and can be a view; otherwise, or
    when ``contiguous``, they are copied out."""
    c, n = xp.ne[0], xp.ne[2]
    es = xp.nb[0]
    if dilation == 1:
        win = ctx.view_strided(xp, (c * taps, t_out, n), (c * es, xp.nb[2]))
        return ctx.cont(win) if contiguous else win
    win = ctx.view_strided(xp, (c, taps, t_out, n), (dilation * c * es, c * es, xp.nb[2]))
    return ctx.reshape(ctx.cont(win), c * taps, t_out, n)


def _flat(ctx: Context, x: Tensor, r: int) -> Tensor:
    """Contiguous time-major x ne (C, T, B) as rows of r samples, ne (C*r, T/r, B): the same memory in long rows,
    which ggml's element-wise ops go through with much less per-row work than rows of C floats."""
    return ctx.reshape(x, x.ne[0] * r, x.ne[1] // r, x.ne[2]) if x.ne[1] % r == 0 else x


def _unflat(ctx: Context, y: Tensor, like: Tensor) -> Tensor:
    """``_flat`` undone: y back in the shape of ``like``."""
    return ctx.reshape(y, *like.ne[:3]) if y.ne != like.ne else y


def _pad_time(ctx: Context, x: Tensor, left: int, right: int, r: int = 1) -> Tensor:
    """Time-major x ne (C, T, B) zero padded in time: ne (C, left+T+right, B). With ``r`` > 1 (T a multiple of it)
    the padding is done in whole ``_flat`` rows of r samples, which ggml pads much faster than rows of C floats,
    and the result is a view of the padded tensor (not contiguous across the batch)."""
    if r <= 1 or x.ne[1] % r:
        return ctx.pad_ext(x, 0, 0, left, right)
    rows_l, rows_r = -(-left // r), -(-right // r)
    xp = ctx.pad_ext(_flat(ctx, x, r), 0, 0, rows_l, rows_r)                 # ne (C*r, T/r + rows, B)
    c, t, n = x.ne[0], x.ne[1] + (rows_l + rows_r) * r, x.ne[2]
    xp = ctx.reshape(xp, c, t, n)
    return ctx.view(xp, (c, left + x.ne[1] + right, n), (xp.nb[1], xp.nb[2]), offset=(rows_l * r - left) * xp.nb[1])


def _tap_major(ctx: Context, w: Tensor, taps: int) -> Tensor:
    """A Conv1d weight, torch (C_out, C_in, K) = ne (K, C_in, C_out), as the ne (C_in*taps, C_out) matrix whose rows
    are ordered like ``_windows`` (tap-major, channel-minor), zero for taps >= K."""
    k, c_in, c_out = w.ne[0], w.ne[1], w.ne[2]
    wt = ctx.cont(ctx.permute(w, 1, 0, 2, 3))                                   # ne (C_in, K, C_out)
    if taps > k:
        wt = ctx.pad(wt, 0, taps - k)
    return ctx.reshape(wt, c_in * taps, c_out)


def conv1d_time_major(ctx: Context, x: Tensor, w: Tensor, b: Tensor | None, padding: int = 0,
                      dilation: int = 1, rules: Windows = Windows(1, False), rows: int = 1) -> Tensor:
    """torch Conv1d (zero padding, stride 1) on time-major x ne (C_in, T, B) -> ne (C_out, T_out, B).
    ``rows``: pad and add the bias on ``_flat`` rows of that many samples (T a multiple of it)."""
    k, c_in = w.ne[0], w.ne[1]
    if c_in != x.ne[0]:
        raise pg.ShapeError(f"conv1d: weight {w!r} expects {c_in} input channels, input {x!r}")
    taps = taps_for(k, c_in, rules.step)
    t_out = x.ne[1] + 2 * padding - dilation * (k - 1)
    # the extra taps read (zero-weighted) samples past the end: pad for them too
    xp = _pad_time(ctx, x, padding, padding + dilation * (taps - k), rows)
    y = ctx.mul_mat(_tap_major(ctx, w, taps), _windows(ctx, xp, taps, dilation, t_out, rules.contiguous))
    if b is None:
        return y
    if rows > 1 and t_out % rows == 0:    # the bias repeated along the row
        yr = _flat(ctx, y, rows)
        return _unflat(ctx, ctx.add(yr, ctx.repeat_4d(b, yr.ne[0], 1, 1, 1)), y)
    return ctx.add(y, b)


def conv_transpose1d_time_major(ctx: Context, x: Tensor, w: Tensor, b: Tensor | None, stride: int, padding: int,
                                output_padding: int, rules: Windows = Windows(1, False)) -> Tensor:
    """torch ConvTranspose1d on time-major x ne (C_in, L, B), w torch (C_in, C_out, K) = ne (K, C_out, C_in), with K
    = n*stride -> ne (C_out, T_out, B), T_out = (L-1)*stride - 2*padding + K + output_padding.

    Output sample m*stride + r sums tap r + stride*j of input frame m - j over j < n: one window of the n frames
    m-n+1..m (n*C_in adjacent floats, a view) times a (n*C_in, stride*C_out) matrix gives all stride samples of
    step m, so the whole upsampling is one mul_mat, cropped by ``padding``.
    """
    k, c_out, c_in = w.ne[0], w.ne[1], w.ne[2]
    if k % stride:
        raise pg.ShapeError(f"conv_transpose1d: kernel {k} is not a multiple of the stride {stride}")
    if x.ne[0] != c_in:
        raise pg.ShapeError(f"conv_transpose1d: weight {w!r} expects {c_in} input channels, input {x!r}")
    n_frames = k // stride
    length, batch = x.ne[1], x.ne[2]
    steps = length + n_frames - 1
    t_out = (length - 1) * stride - 2 * padding + k + output_padding
    if padding + t_out > steps * stride:  # output_padding past the last tap: zero frames give those samples
        steps = -(-(padding + t_out) // stride)
    # weight rows: (frame j of the window, channel i); columns (tap phase r, out channel o)
    wt = ctx.reshape(ctx.cont(ctx.permute(w, 1, 2, 0, 3)), c_in, stride, n_frames, c_out)  # (i, r, tap//stride, o)
    parts = [ctx.view(wt, (c_in, stride, 1, c_out), offset=(n_frames - 1 - j) * wt.nb[2]) for j in range(n_frames)]
    wm = parts[0]
    for p in parts[1:]:
        wm = ctx.concat(wm, p, 2)                                                 # (i, r, j, o), j = window frame
    wm = ctx.reshape(ctx.cont(ctx.permute(wm, 0, 3, 1, 2)), n_frames * c_in, c_out * stride)
    xp = ctx.pad_ext(x, 0, 0, n_frames - 1, steps - length)
    y = ctx.mul_mat(wm, _windows(ctx, xp, n_frames, 1, steps, rules.contiguous))  # ne (C_out*stride, steps, B)
    y = ctx.reshape(y, c_out, stride * steps, batch)
    y = ctx.view(y, (c_out, t_out, batch), (y.nb[1], y.nb[2]), offset=padding * y.nb[1])
    # the bias add writes the cropped view out contiguously
    return ctx.add(y, b) if b is not None else ctx.cont(y)


def reflect_conv1d_time_major(ctx: Context, x: Tensor, w: Tensor, b: Tensor | None,
                              rules: Windows = Windows(1, False)) -> Tensor:
    """torch Conv1d with 'same' reflect padding ((K-1)/2 each side) on time-major x ne (C_in, T, B).

    The interior needs no padding; only the outputs near each end read reflected samples, so those come from small
    reflect-padded edge slices instead of a padded copy of the whole (long) input.
    """
    k, c_in = w.ne[0], w.ne[1]
    p = (k - 1) // 2
    taps = taps_for(k, c_in, rules.step)
    c, t, n = x.ne[0], x.ne[1], x.ne[2]
    left_n, right_n = p, p + taps - k                # outputs whose windows leave [0, T)
    if t < left_n + right_n + taps:
        raise pg.ShapeError(f"reflect conv: input {x!r} is too short for the kernel {k}")
    wm = _tap_major(ctx, w, taps)
    mid = ctx.mul_mat(wm, _windows(ctx, x, taps, 1, t - left_n - right_n, rules.contiguous))
    outs = []
    for count, start, lp, rp in ((left_n, 0, p, 0), (right_n, t - right_n - p, 0, taps - 1 - p)):
        if count == 0:
            outs.append(None)
            continue
        span = count + taps - 1 - lp - rp                                          # input samples they read
        part = ctx.view(x, (c, span, n), (x.nb[1], x.nb[2]), offset=start * x.nb[1])
        chan = ctx.pad_reflect_1d(ctx.cont(ctx.transpose(part)), lp, rp)         # ne (count+taps-1, C, B)
        tm = ctx.cont(ctx.transpose(chan))
        outs.append(ctx.mul_mat(wm, _windows(ctx, tm, taps, 1, count)))
    if outs[0] is not None:
        mid = ctx.concat(outs[0], mid, 1)
    if outs[1] is not None:
        mid = ctx.concat(mid, outs[1], 1)
    return ctx.add(mid, b) if b is not None else mid


# ------------------------------------------------------------------------------------------------------------------
# the reference's modules
# ------------------------------------------------------------------------------------------------------------------
class KernelPredictor:
    """Kernel predictor for the location-variable convolutions: mel frames -> per-frame kernels and biases."""

    def __init__(self, w: ModuleWeights, cond_channels: int, conv_in_channels: int, conv_out_channels: int,
                 conv_layers: int, conv_kernel_size: int, kpnet_hidden_channels: int, kpnet_conv_size: int,
                 kpnet_input_conv_size: int, negative_slope: float):
        self.conv_in_channels, self.conv_out_channels = conv_in_channels, conv_out_channels
        self.conv_kernel_size, self.conv_layers, self.kpnet_conv_size = conv_kernel_size, conv_layers, kpnet_conv_size
        self.negative_slope = negative_slope
        hid, ks = kpnet_hidden_channels, kpnet_conv_size
        kernel_channels = conv_in_channels * conv_out_channels * conv_kernel_size * conv_layers
        bias_channels = conv_out_channels * conv_layers
        self.input_conv = (w("input_conv.0.weight", (hid, cond_channels, kpnet_input_conv_size)),
                           w("input_conv.0.bias", (hid,)))
        self.input_padding = (kpnet_input_conv_size - 1) // 2
        self.residual_convs = [
            [(w(f"residual_convs.{r}.{i}.weight", (hid, hid, ks)), w(f"residual_convs.{r}.{i}.bias", (hid,)))
             for i in (1, 3)]
            for r in range(3)]
        self.kernel_conv = (w("kernel_conv.weight", (kernel_channels, hid, ks)),
                            w("kernel_conv.bias", (kernel_channels,)))
        self.bias_conv = (w("bias_conv.weight", (bias_channels, hid, ks)), w("bias_conv.bias", (bias_channels,)))
        self.lanes = None  # the two convolutions' weights for the fused kernels (prepare_lanes)

    def _hidden(self, ctx: Context, c: Tensor) -> Tensor:
        slope = self.negative_slope
        pad = (self.kpnet_conv_size - 1) // 2
        c = ctx.leaky_relu(layers.conv1d(ctx, c, *self.input_conv, padding=self.input_padding), slope)
        for (w1, b1), (w2, b2) in self.residual_convs:
            r = ctx.leaky_relu(layers.conv1d(ctx, c, w1, b1, padding=pad), slope)
            r = ctx.leaky_relu(layers.conv1d(ctx, r, w2, b2, padding=pad), slope)
            c = ctx.add(c, r)
        return c

    def forward(self, ctx: Context, c: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """c: mel frames ne (L, cond_channels, B). Returns per conv layer the kernels ne (C_in*K, C_out, L, B)
        (rows tap-major like ``_windows``) and the biases ne (C_out, 1, L, B)."""
        c = self._hidden(ctx, c)
        pad = (self.kpnet_conv_size - 1) // 2
        length, batch = c.ne[0], c.ne[2]
        kw, kb = self.kernel_conv
        cols = ctx.im2col(kw, c, 1, 0, pad, 0, 1, 0, False)             # ne (hid*ks, L, B), frame-major output
        ci, co, k, n_layers = self.conv_in_channels, self.conv_out_channels, self.conv_kernel_size, self.conv_layers
        per_layer = ci * co * k
        # the reference's channel order per layer is (C_in, C_out, K) (K fastest); mul_mat wants (C_out, K, C_in)
        kw = ctx.reshape(kw, kw.ne[0] * kw.ne[1], k, co, ci * n_layers)
        kb = ctx.reshape(kb, k, co, ci * n_layers)
        bw, bb = self.bias_conv
        bw = ctx.reshape(bw, bw.ne[0] * bw.ne[1], co * n_layers)
        kernels, bias = [], []
        for i in range(n_layers):
            wi = ctx.view(kw, (kw.ne[0], k, co, ci), offset=i * ci * kw.nb[3])
            wi = ctx.reshape(ctx.cont(ctx.permute(wi, 0, 2, 3, 1)), kw.ne[0], per_layer)
            bi = ctx.view(kb, (k, co, ci), offset=i * ci * kb.nb[2])
            bi = ctx.reshape(ctx.cont(ctx.permute(bi, 1, 2, 0, 3)), per_layer)
            kern = ctx.add(ctx.mul_mat(wi, cols), bi)                    # ne (per_layer, L, B)
            kernels.append(ctx.reshape(kern, ci * k, co, length, batch))
            bwi = ctx.view(bw, (bw.ne[0], co), offset=i * co * bw.nb[1])
            bbi = ctx.view(bb, (co,), offset=i * co * bb.nb[0])
            bias.append(ctx.reshape(ctx.add(ctx.mul_mat(bwi, cols), bbi), co, 1, length, batch))
        return kernels, bias

    def prepare_lanes(self, backend: pg.Backend) -> None:
        """The kernel and bias convolutions' weights in the fused kernels' layout (``forward_lanes``), made once:
        rows (kpnet tap, hidden channel), columns per layer (LVC tap, C_in, C_out), C_out fastest."""
        kw, kb = (t.get() for t in self.kernel_conv)         # (layers*C_in*C_out*K, hid, ks), (layers*C_in*C_out*K,)
        bw, bb = (t.get() for t in self.bias_conv)           # (layers*C_out, hid, ks), (layers*C_out,)
        ci, co, k, n = self.conv_in_channels, self.conv_out_channels, self.conv_kernel_size, self.conv_layers
        hid, ks = kw.shape[1], kw.shape[2]
        arrays = [
            kw.reshape(n, ci, co, k, hid, ks).transpose(5, 4, 0, 3, 1, 2).reshape(ks * hid, n * k * ci * co),
            kb.reshape(n, ci, co, k).transpose(0, 3, 1, 2).reshape(-1),
            bw.transpose(2, 1, 0).reshape(ks * hid, n * co),
            bb]
        self._lanes_ctx = Context(max_tensors=8)
        self.lanes = [self._lanes_ctx.new_tensor("f32", a.shape[::-1]) for a in arrays]
        self._lanes_buffer = backend.alloc_tensors(self._lanes_ctx)
        for t, a in zip(self.lanes, arrays):
            t.set(np.ascontiguousarray(a, dtype=np.float32))

    def forward_lanes(self, ctx: Context, c: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``forward`` for the fused kernels (after ``prepare_lanes``): the kernels as ne (C_out, C_in*K, L, B)
        views (output channels adjacent) and the biases ne (C_out, 1, L, B), computed by one fused convolution
        each over all layers."""
        h = ctx.cont(ctx.transpose(self._hidden(ctx, c)))          # time-major ne (hid, L, B)
        length, batch = h.ne[1], h.ne[2]
        ks, pad = self.kpnet_conv_size, (self.kpnet_conv_size - 1) // 2
        kw, kb, bw, bb = self.lanes
        k_all = fused_kernels.conv1d(ctx, h, kw, kb, ks, 1, pad)   # ne (layers*per_layer, L, B)
        b_all = fused_kernels.conv1d(ctx, h, bw, bb, ks, 1, pad)   # ne (layers*C_out, L, B)
        ci, co, k = self.conv_in_channels, self.conv_out_channels, self.conv_kernel_size
        per_layer = ci * co * k
        kernels = [ctx.view(k_all, (co, ci * k, length, batch), (4 * co, k_all.nb[1], k_all.nb[2]),
                            offset=4 * i * per_layer) for i in range(self.conv_layers)]
        bias = [ctx.view(b_all, (co, 1, length, batch), (4 * co, b_all.nb[1], b_all.nb[2]), offset=4 * i * co)
                for i in range(self.conv_layers)]
        return kernels, bias


class LVCBlock:
    """Upsampling by ``stride``, then location-variable convolutions with gated residuals."""

    def __init__(self, w: ModuleWeights, in_channels: int, cond_channels: int, stride: int, dilations: list[int],
                 lReLU_slope: float, conv_kernel_size: int, cond_hop_length: int, kpnet_hidden_channels: int,
                 kpnet_conv_size: int, kpnet_input_conv_size: int, backend: pg.Backend | None = None,
                 fused: bool = False):
        self.cond_hop_length = cond_hop_length
        self.backend = backend  # the one that will compute the graphs: it decides the shape of the windows
        self.fused = fused      # use tortoise_ggml.kernels (the caller checked they can run here)
        self.conv_layers = len(dilations)
        self.conv_kernel_size = conv_kernel_size
        self.dilations = list(dilations)
        self.stride = stride
        self.slope = lReLU_slope
        self.in_channels = in_channels
        self.kernel_predictor = KernelPredictor(
            w.sub("kernel_predictor"), cond_channels, in_channels, 2 * in_channels, len(dilations), conv_kernel_size,
            kpnet_hidden_channels, kpnet_conv_size, kpnet_input_conv_size, lReLU_slope)
        self.convt_pre = (w("convt_pre.1.weight", (in_channels, in_channels, 2 * stride)),
                          w("convt_pre.1.bias", (in_channels,)))
        self.conv_blocks = [(w(f"conv_blocks.{i}.1.weight", (in_channels, in_channels, conv_kernel_size)),
                             w(f"conv_blocks.{i}.1.bias", (in_channels,))) for i in range(len(dilations))]

    def forward(self, ctx: Context, x: Tensor, c: Tensor, order: list | None = None) -> Tensor:
        """x: time-major ne (C, L', B); c: mel frames ne (L, cond_channels, B) -> ne (C, stride*L', B).
        ``order`` collects each layer's output so the graph computes (and frees) one layer's kernels at a time."""
        in_channels = self.in_channels
        s = self.stride
        # window rules of the three mul_mats here (by their output rows), as of the backend's thread count now
        rules = (lambda rows, batched=False: windows_for(self.backend, rows, batched)) if self.backend is not None \
            else (lambda rows, batched=False: Windows(1, False))
        self.convt_windows = rules(in_channels * s)
        self.conv_windows = rules(in_channels)
        self.lvc_windows = rules(2 * in_channels, batched=True)
        x = conv_transpose1d_time_major(ctx, ctx.leaky_relu(x, self.slope), *self.convt_pre, stride=s,
                                        padding=s // 2 + s % 2, output_padding=s % 2, rules=self.convt_windows)
        hop = self.cond_hop_length
        if self.fused:
            return self._forward_fused(ctx, x, c, order)
        kernels, bias = self.kernel_predictor.forward(ctx, c)
        # the element-wise ops run on rows of hop samples (``_flat``): the same memory, far fewer rows
        for i, (w, b) in enumerate(self.conv_blocks):
            d = self.dilations[i]
            output = _unflat(ctx, ctx.leaky_relu(_flat(ctx, x, hop), self.slope), x)
            output = conv1d_time_major(ctx, output, w, b, padding=d * (self.conv_kernel_size - 1) // 2, dilation=d,
                                       rules=self.conv_windows, rows=hop)
            output = _unflat(ctx, ctx.leaky_relu(_flat(ctx, output, hop), self.slope), output)
            # the reference's output[:, :C] (gate) and output[:, C:] (filter), each its own contiguous tensor
            gate, filt = self.location_variable_convolution(ctx, output, kernels[i], bias[i], hop_size=hop,
                                                            groups=2)          # ne (C, T, B) each
            gated = ctx.mul(ctx.sigmoid(_flat(ctx, gate, hop)), ctx.tanh(_flat(ctx, filt, hop)))
            x = _unflat(ctx, ctx.add(_flat(ctx, x, hop), gated), x)
            if order is not None:
                order.append(x)
        return x

    def _forward_fused(self, ctx: Context, x: Tensor, c: Tensor, order: list | None) -> Tensor:
        """The residual stack with tortoise-ggml's fused CPU kernels (tortoise_ggml/kernels): each convolution
        adds its bias and leaky ReLU, and the location-variable convolution its gated residual, as it goes."""
        if self.kernel_predictor.lanes is None:
            self.kernel_predictor.prepare_lanes(self.backend)
        kernels, bias = self.kernel_predictor.forward_lanes(ctx, c)
        hop, k = self.cond_hop_length, self.conv_kernel_size
        for i, (w, b) in enumerate(self.conv_blocks):
            d = self.dilations[i]
            wl = ctx.reshape(ctx.cont(ctx.permute(w, 2, 1, 0, 3)), w.ne[2], w.ne[1] * w.ne[0])  # (K, C_in, C_out)
            output = _unflat(ctx, ctx.leaky_relu(_flat(ctx, x, hop), self.slope), x)
            output = fused_kernels.conv1d(ctx, output, wl, b, w.ne[0], d, d * (w.ne[0] - 1) // 2, self.slope)
            x = fused_kernels.lvc_gated(ctx, output, kernels[i], bias[i], x, k, hop)
            if order is not None:
                order.append(x)
        return x

    def location_variable_convolution(self, ctx: Context, x: Tensor, kernel: Tensor, bias: Tensor, dilation: int = 1,
                                      hop_size: int = 256, groups: int = 1):
        """x: time-major ne (C_in, L*hop, B); kernel ne (C_in*K, C_out, L, B); bias ne (C_out, 1, L, B)
        -> ne (C_out, L*hop, B): segment l (samples [l*hop, (l+1)*hop)) convolved with its own kernel, the windows
        reaching into the neighbouring segments (zero padded only at the ends), as the reference's unfold does.
        ``groups`` > 1: a list of the output's ``groups`` channel groups, each computed as its own contiguous
        ne (C_out/groups, L*hop, B) (from the same windows), so that ops on one group read it contiguously."""
        c_in, in_length, batch = x.ne[0], x.ne[1], x.ne[2]
        k_rows, c_out, kernel_length = kernel.ne[0], kernel.ne[1], kernel.ne[2]
        k = k_rows // c_in
        if in_length != kernel_length * hop_size:
            raise pg.ShapeError(f"length of x {x!r} and kernel {kernel!r} is not matched (hop {hop_size})")
        if c_out % groups:
            raise pg.ShapeError(f"{c_out} output channels do not split into {groups} groups")
        taps = taps_for(k, c_in, self.lvc_windows.step)
        if taps > k:
            kernel = ctx.pad(kernel, c_in * (taps - k))                    # zero weights for the extra taps
        padding = dilation * (k - 1) // 2
        xp = _pad_time(ctx, x, padding, padding + dilation * (taps - k), hop_size)
        cols = _windows(ctx, xp, taps, dilation, in_length, self.lvc_windows.contiguous)  # ne (C_in*taps, L*hop, B)
        # the same windows as one (C_in*taps, hop) matrix per segment, for mul_mat to pair with the segment's kernel
        if not cols.is_contiguous:   # a view: segments step hop windows along the padded input
            cols = ctx.view_strided(cols, (c_in * taps, hop_size, kernel_length, batch),
                                    (cols.nb[1], hop_size * cols.nb[1], cols.nb[2]))
        else:
            cols = ctx.reshape(cols, c_in * taps, hop_size, kernel_length, batch)
        g = c_out // groups
        outs = []
        for j in range(groups):
            kj = kernel if groups == 1 else ctx.view(kernel, (kernel.ne[0], g, kernel_length, batch),
                                                     kernel.nb[1:], offset=j * g * kernel.nb[1])
            bj = bias if groups == 1 else ctx.view(bias, (g, 1, kernel_length, batch), bias.nb[1:],
                                                   offset=j * g * bias.nb[0])
            o = ctx.add(ctx.mul_mat(kj, cols), bj)                       # ne (g, hop, L, B)
            outs.append(ctx.reshape(o, g, in_length, batch))
        return outs[0] if groups == 1 else outs


class UnivNetGenerator(Model):
    """UnivNet generator on ggml. ``UnivNetGenerator(model_file, backend)``; ``inference(mel)`` -> waveform."""

    component = "vocoder"

    def __init__(self, model_file, backend: pg.Backend | None = None, component: str | None = None,
                 fused: bool | None = None):
        """``fused``: run the residual stacks with tortoise-ggml's fused CPU kernels (tortoise_ggml/kernels, 3-4x
        faster); None (default) uses them wherever they can run (CPU backend, channel counts a multiple of their
        vector width), False never, True insists (ValueError where they cannot run)."""
        super().__init__(model_file, backend, component)
        cfg, w, backend = self.config, self.weights, self.backend
        self.mel_channel = cfg.n_mel_channels
        self.noise_dim = cfg.noise_dim
        self.hop_length = cfg.hop_length
        self.channel_size = channel_size = cfg.channel_size
        self.strides = list(cfg.strides)
        post_k = cfg.conv_post_kernel_size

        self.fused = fused_kernels.choose(
            fused, fused_kernels.usable(backend, channel_size, 2 * channel_size),
            f"the fused vocoder kernels cannot run here (backend {backend.kind}, {channel_size} channels, kernels "
            f"{'built' if fused_kernels.available() else 'missing'} with vector width "
            f"{fused_kernels.vector_width()})")
        self.res_stack = []
        hop_length = 1
        for i, stride in enumerate(self.strides):
            hop_length = stride * hop_length
            self.res_stack.append(LVCBlock(
                w.sub(f"res_stack.{i}"), channel_size, self.mel_channel, stride=stride, dilations=cfg.dilations,
                lReLU_slope=cfg.lReLU_slope, conv_kernel_size=cfg.conv_kernel_size, cond_hop_length=hop_length,
                kpnet_hidden_channels=cfg.kpnet_hidden_channels, kpnet_conv_size=cfg.kpnet_conv_size,
                kpnet_input_conv_size=cfg.kpnet_input_conv_size, backend=backend, fused=self.fused))
        self.conv_pre = (w("conv_pre.weight", (channel_size, self.noise_dim, post_k)),
                         w("conv_pre.bias", (channel_size,)))
        self.conv_post = (w("conv_post.1.weight", (1, channel_size, post_k)), w("conv_post.1.bias", (1,)))
        self.post_windows = windows_for(backend, 1)
        self.slope = cfg.lReLU_slope
        # a graph of a few hundred nodes; every tensor of it is described in its context
        self.graphs = pg.CachedGraph(backend, max_tensors=4096, graph_size=4096)

    def build(self, ctx: Context, c: Tensor, z: Tensor, order: list | None = None) -> Tensor:
        """c: mel ne (L, n_mel, B); z: noise ne (L, noise_dim, B) -> waveform ne (1, L*hop_length, B) (time-major:
        the same memory as the reference's (B, 1, L*hop_length))."""
        zw, zb = self.conv_pre
        pad = (zw.ne[0] - 1) // 2
        zp = ctx.pad_reflect_1d(z, pad, pad)
        cols = ctx.im2col(zw, zp, 1, 0, 0, 0, 1, 0, False)               # ne (noise_dim*7, L, B)
        z = ctx.add(ctx.mul_mat(ctx.reshape(zw, zw.ne[0] * zw.ne[1], zw.ne[2]), cols), zb)   # time-major (C, L, B)
        for res_block in self.res_stack:
            z = res_block.forward(ctx, z, c, order)
        z = ctx.leaky_relu(z, self.slope)
        z = ctx.tanh(reflect_conv1d_time_major(ctx, z, *self.conv_post, rules=self.post_windows))
        return z

    # -- inputs ---------------------------------------------------------------------------------------------------
    def _check(self, name: str, a, shape: tuple) -> np.ndarray:
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, not {type(a).__name__}")
        if a.ndim != len(shape):
            raise ValueError(f"{name} must be {len(shape)}-D {shape}, got shape {a.shape}")
        a = floats(a, name, allow_empty=True, finite=False)
        for got, want, what in zip(a.shape, shape, ("batch", "channels", "frames")):
            if isinstance(want, int) and got != want:
                raise ValueError(f"{name} has {got} {what} (axis of shape {a.shape}), expected {want}")
        return floats(a, name, allow_empty=True)

    def inference(self, c: np.ndarray, z: np.ndarray | None = None, seed: int | None = None,
                  rng: np.random.Generator | None = None) -> np.ndarray:
        """Waveform at the generator's rate for mel ``c`` (B, n_mel_channels, T) float (the diffusion output).

        As the reference: appends 10 frames of -11.5129 (log silence) so the audio does not end in an artifact,
        runs the generator on noise ``z`` (B, noise_dim, T+10), drops the last 10*hop_length samples and clamps
        to [-1, 1]. Returns float32 (B, T*hop_length).

        Without ``z`` the noise is drawn from ``rng`` (or ``numpy.random.default_rng(seed)``) as standard normals:
        the reference draws it with torch.randn, whose stream numpy cannot reproduce, so for identical output pass
        the reference's ``z``.
        """
        if not isinstance(c, np.ndarray):
            raise TypeError(f"mel must be a numpy array, not {type(c).__name__}")
        if c.ndim != 3:
            raise ValueError(f"mel must be 3-D (batch, {self.mel_channel}, frames), got shape {c.shape}")
        c = self._check("mel", c, (None, self.mel_channel, None))
        batch, _, frames = c.shape
        if batch < 1 or frames < 1:
            raise ValueError(f"mel must have at least one batch entry and one frame, got shape {c.shape}")
        mel = np.concatenate([c, np.full((batch, self.mel_channel, PAD_FRAMES), PAD_VALUE, np.float32)], axis=2)
        length = frames + PAD_FRAMES
        if z is None:
            rng = as_generator(rng if rng is not None else seed)
            z = rng.standard_normal((batch, self.noise_dim, length), dtype=np.float32)
        else:
            if not isinstance(z, np.ndarray):
                raise TypeError(f"z must be a numpy array, not {type(z).__name__}")
            if z.shape != (batch, self.noise_dim, length):
                raise ValueError(f"z must have shape (batch, noise_dim, frames + {PAD_FRAMES}) = "
                                 f"{(batch, self.noise_dim, length)}, got {z.shape}")
            z = self._check("z", z, (batch, self.noise_dim, length))
        audio = self.forward(mel, z)                                        # (B, L*hop)
        audio = audio[:, : -(self.hop_length * PAD_FRAMES)]
        return np.clip(audio, -1.0, 1.0)

    def __call__(self, mel: np.ndarray, noise: np.ndarray | None = None, seed: int | None = None,
                 rng: np.random.Generator | None = None) -> np.ndarray:
        """``tts.vocoder(mel, noise=None, seed=...)``: ``inference`` with ``noise`` as z."""
        return self.inference(mel, z=noise, seed=seed, rng=rng)

    def forward(self, mel: np.ndarray, z: np.ndarray) -> np.ndarray:
        """The generator on padded mel (B, n_mel, L) and noise (B, noise_dim, L): float32 (B, L*hop_length)."""
        batch, _, length = mel.shape

        def build(ctx, inputs):
            c_in = inputs.add(mel, name="mel")
            z_in = inputs.add(z, name="noise")
            order: list[Tensor] = []
            out = self.build(ctx, c_in, z_in, order)
            return {"mel": c_in, "noise": z_in}, [out], order

        # the graph depends on the input size only (and the backend's thread count, through the window rules)
        out, = self.graphs.compute((batch, length, self.backend.threads), build, mel=mel, noise=z)
        return out.get().reshape(batch, length * self.hop_length)
