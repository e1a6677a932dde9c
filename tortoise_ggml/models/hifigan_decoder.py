"""HiFi-GAN generator (tortoise/models/hifigan_decoder.py, api_fast.py's decoder) as one ggml graph: autoregressive
latents (B, T, 1024) -> 24 kHz waveform, conditioned on the voice's autoregressive conditioning latent.

Same blocks, names and order as the reference: ResBlock1, ResBlock2, HifiganGenerator (forward, inference).

Layout. Like UnivNet (models/vocoder.py) the audio path runs time-major, ggml ne (C, T, B) (numpy (B, T, C)): a
convolution window is adjacent floats, so the dilated 'same' convolutions of the residual blocks run on
tortoise-ggml's fused CPU kernel (tortoise_ggml.kernels.conv1d: output channels in the vector lanes, windows read in
place, bias and leaky ReLU fused) wherever the output channels are a multiple of its vector width, and as one
mul_mat over (strided) windows otherwise (other backends, odd widths, conv_post's single output channel). A
transposed convolution of stride u and kernel n*u is an n-tap convolution with u*C_out outputs per input frame (its
u output phases), so it runs on the same kernel, or as one mul_mat (vocoder.conv_transpose1d_time_major). The
latents arrive as (B, T, D) already time-major, so no transpose is needed anywhere.

Windows. The generator is fully convolutional after the interpolation, so output samples [s*hop, e*hop) depend
only on the input frames within ``receptive_field()`` of [s, e): ``decode(frames, start, stop)`` computes just that
window (the same values as the whole signal's forward, up to float rounding). ``inference`` decodes long inputs in
windows of ``max_frames`` (bounded memory, a graph reused across windows) and tortoise-ggml's streaming decodes only
the new part of the audio each chunk instead of all of it.

Interpolation. ``inference`` first upsamples the latents exactly as the reference: F.interpolate(mode='linear',
align_corners=False) by 1024/256 and then by 24000/22050, reproduced in numpy with torch's CPU arithmetic
(``interpolate_linear``).
"""
from __future__ import annotations

import math

import numpy as np

import pyggml as pg
from pyggml import Context, Tensor

from .. import kernels as fused_kernels
from ..utils.checks import floats
from .arch_util import ModuleWeights
from .base import Model
from .vocoder import Windows, _flat, _unflat, conv1d_time_major, conv_transpose1d_time_major, windows_for

LRELU_SLOPE = 0.1            # hifigan_decoder.LRELU_SLOPE: before each upsample and inside the ResBlocks
POST_LRELU_SLOPE = 0.01      # F.leaky_relu's default slope, before conv_post
CONV_PRE_POST_KERNEL = 7     # conv_pre / conv_post: Conv1d(..., 7, 1, padding=3)
# HifiganGenerator.inference's two interpolations (hard-coded there): one latent per AR code of 1024 samples at
# 22.05 kHz is 1024 / 256 frames of hop 256, and those frames are resampled from 22.05 to 24 kHz
LATENT_SCALE = 1024 / 256
RATE_SCALE = 24000 / 22050
# frames of a window beyond the receptive field (rounding margin)
CONTEXT_MARGIN = 2


# ------------------------------------------------------------------------------------------------------------------
# the interpolation
# ------------------------------------------------------------------------------------------------------------------
def interpolate_linear(x: np.ndarray, scale_factor: float, axis: int = -1) -> np.ndarray:
    """torch.nn.functional.interpolate(x, scale_factor=scale_factor, mode='linear', align_corners=False) along
    ``axis`` of a float32 array, with the arithmetic of torch's vectorised CPU kernel (upsample_linear1d, built
    for AVX2/AVX-512, where the compiler fuses multiply-adds):

    * output length floor(n * scale_factor) (in double precision);
    * the coordinate scale is float32(1 / scale_factor) (the given factor, not n_out / n_in);
    * source position src = max(fma(scale, i + 0.5, -0.5), 0) in float32; i0 = min(floor(src), n - 1),
      i1 = i0 + (i0 < n - 1); lambda1 = clamp(src - i0, 0, 1), lambda0 = 1 - lambda1 (float32);
    * out = fma(x[i0], lambda0, float32(x[i1] * lambda1));
    * an output as long as the input is the input (torch copies it).

    The fused multiply-adds are computed in float64 (the products are exact there) and rounded once to float32:
    tests/test_hifigan.py finds the result bit-identical to torch's; a torch without the fused kernel would
    differ by at most an ulp.
    """
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[axis]
    if n < 1:
        raise ValueError(f"cannot interpolate an empty axis (shape {x.shape})")
    n_out = int(math.floor(float(n) * float(scale_factor)))
    if n_out == n:
        return x.copy()
    f = np.float32
    scale = np.float64(f(1.0 / float(scale_factor)))
    src = (scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, f(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
    lam1 = np.clip(src - i0.astype(np.float32), f(0), f(1)).astype(np.float32)
    lam0 = (f(1) - lam1).astype(np.float32)
    i1 = i0 + (i0 < n - 1)
    shape = [1] * x.ndim
    shape[axis] = n_out
    b = (np.take(x, i1, axis=axis) * lam1.reshape(shape)).astype(np.float32)
    a = np.take(x, i0, axis=axis).astype(np.float64) * lam0.reshape(shape).astype(np.float64)
    return (a + b).astype(np.float32)


def upsample_latents(latents: np.ndarray, axis: int = 1) -> np.ndarray:
    """HifiganGenerator.inference's interpolations: latents (B, T, D) -> frames (B, F, D), F = floor(floor(4T) *
    24000/22050), along ``axis`` (the reference interpolates the transposed (B, D, T); the values are the same)."""
    return interpolate_linear(interpolate_linear(latents, LATENT_SCALE, axis), RATE_SCALE, axis)


def upsampled_frames(n_latents: int) -> int:
    """Frames ``upsample_latents`` makes of ``n_latents`` latents."""
    return int(math.floor(float(int(math.floor(float(n_latents) * LATENT_SCALE))) * RATE_SCALE))


# ------------------------------------------------------------------------------------------------------------------
# blocks (time-major x ne (C, T, B))
# ------------------------------------------------------------------------------------------------------------------
# 3-tap convolutions by Winograd F(4,3) from this many channels: below it the transforms cost more than the half of
# the products they save (measured on HiFi-GAN's residual blocks, 2 threads)
WINOGRAD_MIN_CHANNELS = 64


def transform_for(in_channels: int, out_channels: int, kernel_size: int) -> str | None:
    """The transform a fused convolution of these sizes runs by: "spectral" (FFT blocks, 5 taps and more),
    "winograd" (3 taps, WINOGRAD_MIN_CHANNELS and more) or None (the direct kernel)."""
    if 5 <= kernel_size <= fused_kernels.SPECTRAL_SIZE // 2:
        return "spectral"
    if kernel_size == 3 and min(in_channels, out_channels) >= WINOGRAD_MIN_CHANNELS:
        return "winograd"
    return None


class SameConv1d:
    """nn.Conv1d(C_in, C_out, k, 1, dilation=d, padding=d*(k-1)/2) on time-major data, with an optional leaky ReLU
    on its input and on its output and an optional residual added after. ``fused``: on the fused direct kernel (its
    weight then prepared once in the kernel's layout); ``spectral`` (fused too): by a transform
    (``transform_for``: FFT blocks, kernels.spectral_conv1d, or Winograd F(4,3), kernels.winograd_conv1d; the
    weight prepared once transformed), where the activations and the residual run inside the convolution's own
    pass."""

    def __init__(self, w: ModuleWeights, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 bias: bool = True, fused: bool = False, spectral: bool = False):
        self.weight = w("weight", (out_channels, in_channels, kernel_size))
        self.bias = w("bias", (out_channels,)) if bias else None
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.dilation = kernel_size, dilation
        self.padding = dilation * (kernel_size - 1) // 2
        self.fused = fused
        self.transform = transform_for(in_channels, out_channels, kernel_size) if fused and spectral else None
        self.lanes: Tensor | None = None     # the weight as ne (C_out, C_in*K), element (j*C_in + i)*C_out + o
        self.spectrum: Tensor | None = None  # the transformed weight, ne (2*C_out, C_in, slots)

    @property
    def spectral(self) -> bool:
        return self.transform is not None

    @property
    def spectrum_array_slots(self) -> int:
        return 3 if self.transform == "winograd" else fused_kernels.SPECTRAL_SIZE // 2

    def lanes_array(self) -> np.ndarray:
        """The weight in the fused kernel's layout, numpy (K, C_in, C_out)."""
        return np.ascontiguousarray(self.weight.get().reshape(self.out_channels, self.in_channels,
                                                              self.kernel_size).transpose(2, 1, 0))

    def spectrum_array(self) -> np.ndarray:
        """The weight transformed, numpy (slots, C_in, 2*C_out)."""
        w = self.weight.get().reshape(self.out_channels, self.in_channels, self.kernel_size)
        if self.transform == "winograd":
            return fused_kernels.winograd_weights(w)
        return fused_kernels.spectral_weights(w)

    def forward(self, ctx: Context, x: Tensor, rules: Windows, leaky_slope: float | None = None,
                rows: int = 1, leaky_in: float | None = None, residual: Tensor | None = None) -> Tensor:
        if self.transform == "winograd":
            return fused_kernels.winograd_conv1d(ctx, x, self.spectrum, self.bias, self.dilation,
                                                 leaky_in=leaky_in, leaky_out=leaky_slope, residual=residual)
        if self.transform == "spectral":
            return fused_kernels.spectral_conv1d(ctx, x, self.spectrum, self.bias, self.kernel_size, self.dilation,
                                                 leaky_in=leaky_in, leaky_out=leaky_slope, residual=residual)
        if leaky_in is not None:
            x = _leaky(ctx, x, leaky_in, rows)
        if self.fused:
            y = fused_kernels.conv1d(ctx, x, self.lanes, self.bias, self.kernel_size, self.dilation,
                                     self.padding, leaky_slope)
        else:
            y = conv1d_time_major(ctx, x, self.weight, self.bias, padding=self.padding, dilation=self.dilation,
                                  rules=rules, rows=rows)
            y = y if leaky_slope is None else _leaky(ctx, y, leaky_slope, rows)
        return y if residual is None else _add(ctx, y, residual, rows)


class ConvTranspose1d:
    """nn.ConvTranspose1d(C_in, C_out, n*u, u, padding=p) on time-major data. Fused: output sample M*u + r sums
    x[M - q] . W[:, :, q*u + r] over q < n, i.e. an n-tap convolution (padding n-1) of the input with u*C_out
    outputs (phase r, channel o at r*C_out + o) per step, whose steps laid end to end are the full output; the
    padding crops p samples at each end."""

    def __init__(self, w: ModuleWeights, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 padding: int, fused: bool = False):
        self.weight = w("weight", (in_channels, out_channels, kernel_size))
        self.bias = w("bias", (out_channels,))
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.fused = stride, padding, fused
        self.taps = kernel_size // stride
        self.lanes: tuple[Tensor, Tensor] | None = None  # (weight ne (u*C_out, C_in*n), bias ne (u*C_out,))

    def lanes_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The polyphase weight as numpy (n, C_in, u, C_out) (tap j = frame M-(n-1)+j reads kernel tap
        (n-1-j)*u + r) and the bias repeated per phase (u*C_out,)."""
        n, u = self.taps, self.stride
        w = self.weight.get().reshape(self.in_channels, self.out_channels, n, u)     # (i, o, q, r)
        lanes = w[:, :, ::-1, :].transpose(2, 0, 3, 1)                                # (j, i, r, o)
        return np.ascontiguousarray(lanes), np.tile(self.bias.get().reshape(-1), u)

    @property
    def lane_shapes(self) -> tuple[tuple[int, int], tuple[int]]:
        n_out = self.stride * self.out_channels
        return (n_out, self.in_channels * self.taps), (n_out,)

    def forward(self, ctx: Context, x: Tensor, rules: Windows) -> Tensor:
        if not self.fused:
            return conv_transpose1d_time_major(ctx, x, self.weight, self.bias, stride=self.stride,
                                               padding=self.padding, output_padding=0, rules=rules)
        n, u, c_out = self.taps, self.stride, self.out_channels
        length, batch = x.ne[1], x.ne[2]
        t_out = (length - 1) * u - 2 * self.padding + self.kernel_size
        steps = length + n - 1
        xp = ctx.pad_ext(x, 0, 0, 0, n - 1) if n > 1 else x                        # zero frames for the last steps
        y = fused_kernels.conv1d(ctx, xp, self.lanes[0], self.lanes[1], n, 1, n - 1)  # ne (u*C_out, steps, B)
        y = ctx.reshape(y, c_out, u * steps, batch)
        return ctx.cont(ctx.view(y, (c_out, t_out, batch), (y.nb[1], y.nb[2]), offset=self.padding * y.nb[1]))


def _leaky(ctx: Context, x: Tensor, slope: float, rows: int) -> Tensor:
    """leaky ReLU on time-major x, in rows of ``rows`` samples (the same memory, far fewer rows)."""
    return _unflat(ctx, ctx.leaky_relu(_flat(ctx, x, rows), slope), x)


def _add(ctx: Context, a: Tensor, b: Tensor, rows: int) -> Tensor:
    return _unflat(ctx, ctx.add(_flat(ctx, a, rows), _flat(ctx, b, rows)), a)


class ResBlock1:
    """Three (leaky ReLU, dilated conv, leaky ReLU, conv) pairs with residuals."""

    def __init__(self, w: ModuleWeights, channels: int, kernel_size: int, dilation, fused: bool,
                 spectral: bool = False):
        self.convs1 = [SameConv1d(w.sub(f"convs1.{i}"), channels, channels, kernel_size, d, fused=fused,
                                  spectral=spectral) for i, d in enumerate(dilation)]
        self.convs2 = [SameConv1d(w.sub(f"convs2.{i}"), channels, channels, kernel_size, 1, fused=fused,
                                  spectral=spectral) for i in range(len(dilation))]

    @property
    def convs(self) -> list[SameConv1d]:
        return self.convs1 + self.convs2

    @property
    def reach(self) -> int:
        """Samples each side an output depends on."""
        return sum(c.padding for c in self.convs)

    def forward(self, ctx: Context, x: Tensor, rules: Windows, rows: int) -> Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            xt = c1.forward(ctx, x, rules, LRELU_SLOPE, rows, leaky_in=LRELU_SLOPE)  # both leaky ReLUs
            x = c2.forward(ctx, xt, rules, None, rows, residual=x)                  # xt = c2(xt); x = xt + x
        return x


class ResBlock2:
    """Two (leaky ReLU, dilated conv) steps with residuals."""

    def __init__(self, w: ModuleWeights, channels: int, kernel_size: int, dilation, fused: bool,
                 spectral: bool = False):
        self.convs_ = [SameConv1d(w.sub(f"convs.{i}"), channels, channels, kernel_size, d, fused=fused,
                                  spectral=spectral) for i, d in enumerate(dilation)]

    @property
    def convs(self) -> list[SameConv1d]:
        return list(self.convs_)

    @property
    def reach(self) -> int:
        return sum(c.padding for c in self.convs_)

    def forward(self, ctx: Context, x: Tensor, rules: Windows, rows: int) -> Tensor:
        for c in self.convs_:
            x = c.forward(ctx, x, rules, None, rows, leaky_in=LRELU_SLOPE, residual=x)
        return x


# ------------------------------------------------------------------------------------------------------------------
# the generator
# ------------------------------------------------------------------------------------------------------------------
class HifiganGenerator(Model):
    """HiFi-GAN on ggml. ``HifiganGenerator(model_file)``; ``inference(latents, voice_latent)`` -> waveform."""

    component = "hifigan"

    def __init__(self, model_file, backend: pg.Backend | None = None, component: str | None = None,
                 fused: bool | None = None, max_frames: int = 1024, spectral: bool = True):
        """``fused``: run the convolutions with tortoise-ggml's fused CPU kernel (tortoise_ggml/kernels) where their
        output channels suit it; None (default) wherever it can run, False never, True insists (ValueError where
        it cannot run: another backend, the library missing, channel counts not a multiple of its vector width).
        ``spectral``: where fused, the residual blocks' long convolutions (5 taps or more) by FFT blocks
        (kernels.spectral_conv1d: 2.5-3.5x fewer operations at 7 and 11 taps, float32 rounding of the same order,
        ~2x the memory of their weights); False keeps every convolution direct.
        ``max_frames``: ``inference`` decodes longer inputs in windows of this many frames (plus context)."""
        super().__init__(model_file, backend, component)
        cfg, w, backend = self.config, self.weights, self.backend
        if int(max_frames) != max_frames or max_frames < 1:
            raise ValueError(f"max_frames must be a positive integer, got {max_frames!r}")
        self.max_frames = int(max_frames)
        self.in_channels, self.out_channels = cfg.in_channels, cfg.out_channels
        self.cond_channels = cfg.cond_channels
        self.hop_length = cfg.hop_length
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.num_upsamples = len(cfg.upsample_factors)
        ch0 = cfg.upsample_initial_channel
        widths = [ch0] + [cfg.channels(i) for i in range(self.num_upsamples)]
        can_run = fused_kernels.usable(backend, *widths)
        self.fused = fused_kernels.choose(
            fused, can_run,
            f"the fused HiFi-GAN kernels cannot run here (backend {backend.kind}, channels {widths}, kernels "
            f"{'built' if fused_kernels.available() else 'missing'} with vector width "
            f"{fused_kernels.vector_width()})")
        if fused is None:  # wherever it fits: per convolution, by its output channels
            def use(c):
                return fused_kernels.usable(backend, c)
        else:
            def use(c):
                return self.fused

        self.conv_pre = SameConv1d(w.sub("conv_pre"), cfg.in_channels, ch0, CONV_PRE_POST_KERNEL, fused=use(ch0))
        self.ups = []
        for i, (u, k) in enumerate(zip(cfg.upsample_factors, cfg.upsample_kernel_sizes)):
            c_in, c_out = widths[i], widths[i + 1]
            self.ups.append(ConvTranspose1d(w.sub(f"ups.{i}"), c_in, c_out, k, u, (k - u) // 2,
                                            fused=use(u * c_out)))
        block = ResBlock1 if cfg.resblock_type == "1" else ResBlock2
        self.resblocks = []
        for i in range(self.num_upsamples):
            ch = widths[i + 1]
            for j, k in enumerate(cfg.resblock_kernel_sizes):
                n = i * self.num_kernels + j
                self.resblocks.append(block(w.sub(f"resblocks.{n}"), ch, k, cfg.dilations(j), fused=use(ch),
                                            spectral=spectral and fused_kernels.usable(backend, ch)))
        self.conv_post = SameConv1d(w.sub("conv_post"), widths[-1], cfg.out_channels, CONV_PRE_POST_KERNEL,
                                    bias=cfg.conv_post_bias, fused=False)
        self.cond_layer = None
        if cfg.cond_channels:
            self.cond_layer = (w("cond_layer.weight", (ch0, cfg.cond_channels, 1)), w("cond_layer.bias", (ch0,)))
        # the fused convolutions' weights in the kernel's layout, made now rather than before the first audio
        self._prepare_lanes()
        # a graph of a few hundred nodes; every tensor of it is described in its context
        self.graphs = pg.CachedGraph(backend, max_tensors=4096, graph_size=4096)

    # -- sizes -----------------------------------------------------------------------------------------------------
    def receptive_field(self) -> int:
        """Input frames each side of a frame that its output samples depend on (rounded up), plus a margin."""
        reach = (CONV_PRE_POST_KERNEL - 1) / 2                      # conv_pre, in frames
        rate = 1
        for i, up in enumerate(self.ups):
            reach += up.taps / rate                                  # the transposed conv's taps, input samples
            rate *= up.stride
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            reach += max(b.reach for b in blocks) / rate
        reach += self.conv_post.padding / rate
        return int(math.ceil(reach)) + CONTEXT_MARGIN

    # -- the graph -------------------------------------------------------------------------------------------------
    def _prepare_lanes(self) -> None:
        """Every fused convolution's weight in the kernel's layout, made once into a buffer of the backend (a copy
        of the convolution weights: ~70 MB at api_fast's size)."""
        every = [self.conv_pre] + [c for b in self.resblocks for c in b.convs]
        convs = [c for c in every if c.fused and not c.spectral]
        spectral = [c for c in every if c.spectral]
        ups = [u for u in self.ups if u.fused]
        if not convs and not ups and not spectral:
            return
        self._lanes_ctx = Context(max_tensors=len(convs) + len(spectral) + 2 * len(ups) + 8)
        conv_tensors = [self._lanes_ctx.new_tensor("f32", (c.out_channels, c.in_channels * c.kernel_size))
                        for c in convs]
        spectral_tensors = [self._lanes_ctx.new_tensor("f32", (2 * c.out_channels, c.in_channels,
                                                               c.spectrum_array_slots)) for c in spectral]
        up_tensors = [tuple(self._lanes_ctx.new_tensor("f32", shape) for shape in u.lane_shapes) for u in ups]
        self._lanes_buffer = self.backend.alloc_tensors(self._lanes_ctx)
        for c, t in zip(convs, conv_tensors):
            t.set(c.lanes_array().reshape(c.kernel_size * c.in_channels, c.out_channels))
            c.lanes = t
        for c, t in zip(spectral, spectral_tensors):
            t.set(c.spectrum_array())
            c.spectrum = t
        for u, (tw, tb) in zip(ups, up_tensors):
            wl, bl = u.lanes_arrays()
            tw.set(wl.reshape(u.taps * u.in_channels, u.stride * u.out_channels))
            tb.set(bl)
            u.lanes = (tw, tb)

    def build(self, ctx: Context, x: Tensor, g: Tensor | None = None) -> Tensor:
        """x: frames, time-major ne (in_channels, T, B); g: the conditioning ne (cond_channels, B) -> waveform
        ne (out_channels, T*hop_length, B) (for one output channel the memory of the reference's (B, 1, T*hop))."""
        backend = self.backend
        o = self.conv_pre.forward(ctx, x, windows_for(backend, self.conv_pre.out_channels))
        if self.cond_layer is not None:
            if g is None:
                raise ValueError("this HiFi-GAN is conditioned (cond_channels > 0): pass the voice latent g")
            cw, cb = self.cond_layer
            cond = ctx.add(ctx.mul_mat(ctx.reshape(cw, cw.ne[1], cw.ne[2]), g), cb)      # ne (ch0, B)
            o = ctx.add(o, ctx.reshape(cond, cond.ne[0], 1, g.ne[1]))
        rate = 1
        for i, up in enumerate(self.ups):
            o = _leaky(ctx, o, LRELU_SLOPE, rate)
            c_out = up.out_channels
            o = up.forward(ctx, o, windows_for(backend, c_out * up.stride))
            rate *= up.stride
            rules = windows_for(backend, c_out)
            z_sum = None
            for j in range(self.num_kernels):
                z = self.resblocks[i * self.num_kernels + j].forward(ctx, o, rules, rate)
                z_sum = z if z_sum is None else _add(ctx, z_sum, z, rate)
            o = _unflat(ctx, ctx.scale(_flat(ctx, z_sum, rate), 1.0 / self.num_kernels), z_sum)
        o = _leaky(ctx, o, POST_LRELU_SLOPE, rate)
        o = self.conv_post.forward(ctx, o, windows_for(backend, self.out_channels), rows=rate)
        return _unflat(ctx, ctx.tanh(_flat(ctx, o, rate)), o)

    def _run(self, frames: np.ndarray, g: np.ndarray | None) -> np.ndarray:
        """The graph on time-major frames (B, T, in_channels) and g (B, cond_channels) -> (B, T*hop, out)."""
        batch, length, _ = frames.shape

        def build(ctx, inputs):
            x_in = inputs.add(frames, name="x")
            named = {"x": x_in}
            g_in = None
            if g is not None:
                g_in = named["g"] = inputs.add(g, name="g")
            return named, [self.build(ctx, x_in, g_in)]

        arrays = {"x": frames} if g is None else {"x": frames, "g": g}
        # the graph depends on the input size (and the backend's thread count, through the window rules)
        out, = self.graphs.compute((batch, length, g is not None, self.backend.threads), build, **arrays)
        return out.get().reshape(batch, length * self.hop_length, self.out_channels)

    # -- inputs ----------------------------------------------------------------------------------------------------
    def _conditioning(self, g, batch: int) -> np.ndarray | None:
        """The voice latent as (B, cond_channels): (cond,), (1|B, cond) or the reference's (1|B, cond, 1)."""
        if self.cond_layer is None:
            if g is not None:
                raise ValueError("this HiFi-GAN has no cond_layer (cond_channels = 0): it takes no voice latent")
            return None
        if g is None:
            raise ValueError(f"this HiFi-GAN is conditioned on a voice latent of {self.cond_channels} channels: "
                             "pass it (the autoregressive conditioning latent)")
        g = floats(g, "voice latent")
        if g.ndim == 3 and g.shape[2] == 1:
            g = g[:, :, 0]
        if g.ndim == 1:
            g = g[None]
        if g.ndim != 2 or g.shape[1] != self.cond_channels or g.shape[0] not in (1, batch):
            raise ValueError(f"voice latent must be ({self.cond_channels},) or (1 or {batch}, {self.cond_channels}), "
                             f"got shape {g.shape}")
        return np.ascontiguousarray(np.broadcast_to(g, (batch, self.cond_channels)), dtype=np.float32)

    def _frames(self, x, name: str) -> np.ndarray:
        x = floats(x, name, ndim=(2, 3))
        if x.ndim == 2:
            x = x[None]
        if x.shape[2] != self.in_channels:
            raise ValueError(f"{name} must be (batch, frames, {self.in_channels}), got shape {x.shape}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{name} must have at least one batch entry and one frame, got shape {x.shape}")
        return x

    # -- tortoise's methods ----------------------------------------------------------------------------------------
    def forward(self, x: np.ndarray, g: np.ndarray | None = None) -> np.ndarray:
        """The reference's forward: x (B, in_channels, T) frames, g (B, cond_channels, 1) -> (B, out_channels,
        T*hop_length) float32 (computed in windows of ``max_frames``, see ``decode``)."""
        x = floats(x, "x", ndim=3)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (batch, {self.in_channels}, frames), got shape {x.shape}")
        y = self.decode(np.ascontiguousarray(x.transpose(0, 2, 1)), g)
        return np.ascontiguousarray(y.transpose(0, 2, 1))

    def inference(self, c: np.ndarray, g: np.ndarray | None = None) -> np.ndarray:
        """The reference's inference: latents ``c`` (B, T, in_channels) (the AR latents; (T, in_channels) is B = 1)
        and the voice latent ``g`` (the AR conditioning latent, (cond_channels,) or (1|B, cond_channels)) ->
        waveform (B, 1, S) float32 at 24 kHz, S = hop_length * floor(floor(4T) * 24000 / 22050).

        As the reference: the latents are interpolated linearly x 1024/256, then x 24000/22050 (torch's
        arithmetic, ``interpolate_linear``), and the generator runs on them with the voice latent through
        cond_layer added to conv_pre's output."""
        c = self._frames(c, "latents")
        frames = upsample_latents(c, axis=1)
        y = self.decode(frames, g)                                      # (B, S, out)
        return np.ascontiguousarray(y.transpose(0, 2, 1))

    __call__ = inference

    def decode(self, frames: np.ndarray, g: np.ndarray | None = None, start: int = 0, stop: int | None = None,
               max_frames: int | None = None) -> np.ndarray:
        """Output samples [start*hop, stop*hop) of the generator on time-major ``frames`` (B, F, in_channels)
        (the interpolated latents, ``upsample_latents``): (B, (stop-start)*hop, out_channels) float32.

        Only the frames within ``receptive_field()`` of [start, stop) are computed on, in windows of at most
        ``max_frames`` (default: the model's) frames of output plus that context each side: the values are those
        of the whole signal's forward up to float rounding, the memory and the work bounded by the window."""
        frames = self._frames(frames, "frames")
        batch, n = frames.shape[:2]
        stop = n if stop is None else int(stop)
        if not 0 <= start < stop <= n:
            raise ValueError(f"decode: need 0 <= start ({start}) < stop ({stop}) <= frames ({n})")
        g = self._conditioning(g, batch)
        step = self.max_frames if max_frames is None else int(max_frames)
        if step < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        ctx = self.receptive_field()
        hop = self.hop_length
        parts = []
        for a in range(start, stop, step):
            b = min(a + step, stop)
            lo, hi = max(0, a - ctx), min(n, b + ctx)
            y = self._run(np.ascontiguousarray(frames[:, lo:hi]), g)
            parts.append(y[:, (a - lo) * hop:(b - lo) * hop])
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


__all__ = ["HifiganGenerator", "ResBlock1", "ResBlock2", "SameConv1d", "interpolate_linear", "transform_for",
           "upsample_latents", "upsampled_frames", "LRELU_SLOPE", "LATENT_SCALE", "RATE_SCALE",
           "WINOGRAD_MIN_CHANNELS"]
