"""Tortoise's diffusion decoder (tortoise/models/diffusion_decoder.py DiffusionTts, tortoise-tts 3.0.0) on ggml.

Same blocks, names and order as the reference: timestep_embedding, ResBlock, DiffusionLayer, DiffusionTts
(get_conditioning, timestep_independent, forward), with the pieces of tortoise/models/arch_util.py
(normalization, QKVAttentionLegacy, AttentionBlock) and xtransformers.RelativePositionBias they use.

Inference-only: dropout, layer drop, the training-time unconditioned batches and the DDP "extraneous addition"
(0 * the mean of unused parameters) have no effect at inference and are left out.

Layouts follow tortoise_ggml.layers: channel data ne (T, C, B) (the memory of torch's (B, C, T)); 1x1 convolutions
and attention run on sequence data ne (C, T, B). Numpy arrays in and out have the reference's shapes.

One sampling step calls ``forward`` on a batch that holds both the conditioned and the conditioning-free entry
(``conditioning_free`` may be a per-entry sequence), so each step is one graph; the graph is built once per
(batch, length, conditioning pattern) and recomputed with new inputs.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

import pyggml as pg
from pyggml import Context, Graph, Tensor

from .. import kernels, layers
from .arch_util import KEY_STEP, normalization, qkv_attention_legacy

COMPONENT = "diffusion"
HPARAMS = ("model_channels", "num_layers", "in_channels", "out_channels", "in_latent_channels", "in_tokens",
           "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance")
# GroupNorm32's eps: torch.nn.GroupNorm's default, which arch_util.normalization keeps
GROUP_NORM_EPS = 1e-5
# timestep_embedding's default, which DiffusionTts.forward uses
MAX_PERIOD = 10000
# the output length of the conditioning path: 22.05 kHz AR mel codes (4 frames each) -> 24 kHz diffusion frames
# (do_spectrogram_diffusion's output_seq_len), exposed for callers that size inputs
CODE_TO_MEL_FRAMES = (4 * 24000, 22050)


def output_seq_len(n_codes: int) -> int:
    """Frames of mel the diffusion model makes for ``n_codes`` AR codes/latents, as tortoise/api.py computes it."""
    return n_codes * CODE_TO_MEL_FRAMES[0] // CODE_TO_MEL_FRAMES[1]


# ------------------------------------------------------------------------------------------------------------------
# numpy helpers: inputs, index tables
# ------------------------------------------------------------------------------------------------------------------
def is_latent(t: np.ndarray) -> bool:
    """The reference tells AR latents (float) from AR codes (long) by dtype."""
    return t.dtype.kind == "f"


def is_sequence(t: np.ndarray) -> bool:
    return t.dtype.kind in "iu"


def _floats(a, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return np.ascontiguousarray(a, dtype=np.float32)


def _relative_position_bucket(relative_position: np.ndarray, causal: bool = True, num_buckets: int = 32,
                              max_distance: int = 128) -> np.ndarray:
    """xtransformers.RelativePositionBias._relative_position_bucket, in float32 like torch, so that distances near a
    bucket edge land in the same bucket."""
    ret = np.zeros(relative_position.shape, dtype=np.int64)
    n = -relative_position.astype(np.int64)
    if not causal:
        num_buckets //= 2
        ret += (n < 0).astype(np.int64) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # n = 0 gives log(0) = -inf, which is_small replaces by n anyway: clip so the cast to int is defined
    with np.errstate(divide="ignore"):
        ratio = np.log(n.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
    scaled = np.trunc(ratio * np.float32(num_buckets - max_exact)).clip(-num_buckets, num_buckets)
    val_if_large = max_exact + scaled.astype(np.int64)
    val_if_large = np.minimum(val_if_large, num_buckets - 1)
    return ret + np.where(is_small, n, val_if_large)


def relative_position_buckets(n: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Buckets of RelativePositionBias.forward (non-causal) for n queries and keys, by distance: int32 (2n-1,),
    entry m for key - query = m - (n-1). The (query i, key j) table is entry j - i + n - 1."""
    rel_pos = np.arange(2 * n - 1, dtype=np.int64) - (n - 1)
    return _relative_position_bucket(rel_pos, causal=False, num_buckets=num_buckets,
                                     max_distance=max_distance).astype(np.int32)


def nearest_indices(input_size: int, output_size: int) -> np.ndarray:
    """Source index of each output position of F.interpolate(mode='nearest', size=output_size): torch's
    nearest_idx, which computes the ratio and the products in float32 (so for non-integer ratios the pattern is
    float32's, not exact arithmetic's)."""
    if output_size == input_size:
        return np.arange(output_size)
    if output_size == 2 * input_size:
        return np.arange(output_size) >> 1
    scale = np.float32(input_size) / np.float32(output_size)
    idx = np.floor(np.arange(output_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, input_size - 1)


class _Inputs:
    """Graph inputs of one graph build: their tensors, the arrays to write into them, and the tables (distance
    buckets, key padding) shared by every attention block over the same length."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.feed: dict[Tensor, np.ndarray] = {}
        self._tables: dict[tuple, Tensor] = {}

    def add(self, array: np.ndarray, type: str = "f32") -> Tensor:
        t = self.ctx.new_tensor(type, tuple(reversed(array.shape))).set_input()
        self.feed[t] = array
        return t

    def key_padding(self, n: int, n_keys: int) -> Tensor:
        """F32 ne (n_keys,): 0 for the n real keys, -inf for the padding after them (a soft_max mask row)."""
        key = ("key_padding", n, n_keys)
        if key not in self._tables:
            row = np.zeros(n_keys, np.float32)
            row[n:] = -np.inf
            self._tables[key] = self.add(row)
        return self._tables[key]

    def buckets(self, n: int, num_buckets: int, max_distance: int) -> Tensor:
        """I32 ne (2n-1,): relative_position_buckets(n, ...)."""
        key = (n, num_buckets, max_distance)
        if key not in self._tables:
            self._tables[key] = self.add(relative_position_buckets(n, num_buckets, max_distance), "i32")
        return self._tables[key]


# ------------------------------------------------------------------------------------------------------------------
# torch modules
# ------------------------------------------------------------------------------------------------------------------
class Conv1d:
    """nn.Conv1d on channel data ne (T, C_in, B)."""

    def __init__(self, weights: Mapping[str, Tensor], prefix: str, in_channels: int, out_channels: int,
                 kernel_size: int, stride: int = 1, padding: int = 0):
        self.weight = weights[prefix + ".weight"]
        self.bias = weights[prefix + ".bias"]
        # torch's (C_out, C_in, K), or flattened to (C_out, C_in*K) as f16/q8_0 files store it
        if tuple(self.weight.ne[:3]) not in ((kernel_size, in_channels, out_channels),
                                             (kernel_size * in_channels, out_channels, 1)):
            raise ValueError(f"{prefix}.weight {self.weight!r} is not a Conv1d({in_channels}, {out_channels}, "
                             f"{kernel_size}) weight")
        self.in_channels, self.kernel_size, self.stride, self.padding = in_channels, kernel_size, stride, padding

    @property
    def matrix(self) -> bool:
        """Whether the kernel is stored flattened (a matrix, possibly quantized)."""
        return self.weight.ne[:2] != (self.kernel_size, self.in_channels)

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        return layers.conv1d(ctx, x, self.weight, self.bias, self.stride, self.padding,
                             kernel_size=self.kernel_size)


class Linear:
    """nn.Linear on vectors ne (in, B)."""

    def __init__(self, weights: Mapping[str, Tensor], prefix: str):
        self.weight = weights[prefix + ".weight"]
        self.bias = weights[prefix + ".bias"]

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        return layers.linear(ctx, x, self.weight, self.bias)


class GroupNorm32:
    """arch_util.normalization(channels) on channel data ne (T, C, B)."""

    def __init__(self, weights: Mapping[str, Tensor], prefix: str, channels: int):
        self.weight = weights[prefix + ".weight"]
        self.bias = weights[prefix + ".bias"]
        if self.weight.ne[0] != channels:
            raise ValueError(f"{prefix}.weight {self.weight!r} does not have {channels} channels")
        self.groups = normalization(channels)

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        return layers.group_norm(ctx, x, self.weight, self.bias, self.groups, GROUP_NORM_EPS)


def _seq(ctx: Context, x: Tensor) -> Tensor:
    """Channel data ne (T, C, B) <-> sequence data ne (C, T, B)."""
    return ctx.cont(ctx.transpose(x))


class RelativePositionBias:
    """xtransformers.RelativePositionBias(scale, causal=False, num_buckets, max_distance, heads): a learned bias per
    head and distance bucket, added (times ``scale``) to the attention scores."""

    def __init__(self, weights: Mapping[str, Tensor], prefix: str, scale: float, heads: int, num_buckets: int,
                 max_distance: int):
        self.relative_attention_bias = weights[prefix + ".relative_attention_bias.weight"]   # ne (heads, buckets)
        if tuple(self.relative_attention_bias.ne[:2]) != (heads, num_buckets):
            raise ValueError(f"{prefix}.relative_attention_bias.weight {self.relative_attention_bias!r} is not "
                             f"({num_buckets} buckets, {heads} heads)")
        self.scale, self.heads = scale, heads
        self.num_buckets, self.max_distance = num_buckets, max_distance

    def per_distance(self, ctx: Context, inputs: _Inputs, n: int) -> Tensor:
        """The scaled bias per key - query distance, -(n-1) .. n-1: F32 ne (2n-1, heads)."""
        buckets = inputs.buckets(n, self.num_buckets, self.max_distance)
        per_distance = ctx.get_rows(self.relative_attention_bias, buckets)                       # ne (H, 2n-1)
        return ctx.scale(ctx.cont(ctx.transpose(per_distance)), self.scale)

    def forward(self, ctx: Context, inputs: _Inputs, n: int, n_keys: int | None = None) -> Tensor:
        """The bias for n queries and keys as a soft_max mask: F32 ne (n keys, n queries, heads); with ``n_keys``
        > n, followed by -inf for n_keys - n padding keys (ne (n_keys, n, heads)).

        The bias depends on key - query only, so it is gathered once per distance and then laid out as the
        (query, key) matrix without a gather per element: n copies of the per-distance row, read back with a row
        step one float shorter than the row, start row i at distance -i (Transformer-XL's "relative shift")."""
        per_distance = self.per_distance(ctx, inputs, n)                                         # ne (2n-1, H)
        rows = ctx.repeat_4d(ctx.reshape(per_distance, 2 * n - 1, 1, self.heads), 2 * n - 1, n, self.heads)
        es = rows.nb[0]
        bias = ctx.cont(ctx.view_strided(rows, (n, n, self.heads), ((2 * n - 2) * es, (2 * n - 1) * n * es),
                                         (n - 1) * es))
        if n_keys is not None and n_keys > n:
            bias = ctx.add(ctx.pad(bias, n_keys - n), inputs.key_padding(n, n_keys))
        return bias


class AttentionBlock:
    """arch_util.AttentionBlock(channels, num_heads, relative_pos_embeddings=True) on channel data ne (T, C, B)."""

    def __init__(self, weights: Mapping[str, Tensor], prefix: str, channels: int, num_heads: int, num_buckets: int,
                 max_distance: int, fused: bool = False):
        if channels % num_heads:
            raise ValueError(f"{prefix}: {channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.fused = fused  # softmax with the relative position bias by tortoise_ggml.kernels (CPU)
        self.norm = GroupNorm32(weights, prefix + ".norm", channels)
        self.qkv = Conv1d(weights, prefix + ".qkv", channels, 3 * channels, 1)
        self.proj_out = Conv1d(weights, prefix + ".proj_out", channels, channels, 1)
        self.relative_pos_embeddings = RelativePositionBias(
            weights, prefix + ".relative_pos_embeddings", scale=(channels // num_heads) ** .5, heads=num_heads,
            num_buckets=num_buckets, max_distance=max_distance)

    @staticmethod
    def _conv1x1(ctx: Context, conv: Conv1d, x: Tensor) -> Tensor:
        """A 1x1 Conv1d on sequence data ne (C_in, T, B) -> ne (C_out, T, B)."""
        w = conv.weight
        return layers.linear(ctx, x, w if conv.matrix else ctx.reshape(w, w.ne[1], w.ne[2]), conv.bias)

    def forward(self, ctx: Context, inputs: _Inputs, x: Tensor) -> Tensor:
        qkv = self._conv1x1(ctx, self.qkv, _seq(ctx, self.norm.forward(ctx, x)))
        t = x.ne[0]
        if self.fused:
            table = self.relative_pos_embeddings.per_distance(ctx, inputs, t)
            h = qkv_attention_legacy(ctx, qkv, self.num_heads, rel_table=table)
        else:
            h = qkv_attention_legacy(ctx, qkv, self.num_heads,
                                     self.relative_pos_embeddings.forward(ctx, inputs, t, t + -t % KEY_STEP))
        h = self._conv1x1(ctx, self.proj_out, h)
        return ctx.add(x, _seq(ctx, h))


def timestep_embedding(ctx: Context, timesteps: Tensor, dim: int, max_period: int = MAX_PERIOD) -> Tensor:
    """[cos | sin] sinusoidal embeddings of F32 timesteps ne (N,) -> ne (dim, N); ggml's op has the reference's
    frequencies, order and odd-dim zero column."""
    return ctx.timestep_embedding(timesteps, dim, max_period)


class ResBlock:
    """diffusion_decoder.ResBlock(channels, channels, dropout, use_scale_shift_norm=True) with the default
    efficient_config (1x1 input conv) and kernel_size 3, on channel data ne (T, C, B) and embeddings ne (C, B)."""

    def __init__(self, weights: Mapping[str, Tensor], prefix: str, channels: int, emb_channels: int):
        # in_layers: GroupNorm32, SiLU, Conv1d(1x1); emb_layers: SiLU, Linear(emb, 2C);
        # out_layers: GroupNorm32, SiLU, Dropout, Conv1d(k3, p1)
        self.channels = channels
        self.in_layers = (GroupNorm32(weights, prefix + ".in_layers.0", channels),
                          Conv1d(weights, prefix + ".in_layers.2", channels, channels, 1))
        self.emb_layers = Linear(weights, prefix + ".emb_layers.1")
        if tuple(self.emb_layers.weight.ne[:2]) != (emb_channels, 2 * channels):
            raise ValueError(f"{prefix}.emb_layers.1.weight {self.emb_layers.weight!r} is not "
                             f"Linear({emb_channels}, {2 * channels})")
        self.out_layers = (GroupNorm32(weights, prefix + ".out_layers.0", channels),
                           Conv1d(weights, prefix + ".out_layers.3", channels, channels, 3, padding=1))

    def forward(self, ctx: Context, x: Tensor, emb: Tensor) -> Tensor:
        in_norm, in_conv = self.in_layers
        h = in_conv.forward(ctx, ctx.silu(in_norm.forward(ctx, x)))
        emb_out = self.emb_layers.forward(ctx, ctx.silu(emb))                    # ne (2C, B)
        c, b, es = self.channels, emb_out.ne[1], emb_out.nb[0]
        # torch.chunk(emb_out, 2, dim=1), each as ne (1, C, B) to broadcast over time
        scale = ctx.reshape(ctx.cont(ctx.view(emb_out, (c, b), (emb_out.nb[1],), 0)), 1, c, b)
        shift = ctx.reshape(ctx.cont(ctx.view(emb_out, (c, b), (emb_out.nb[1],), c * es)), 1, c, b)
        out_norm, out_conv = self.out_layers
        h = ctx.add(ctx.mul(out_norm.forward(ctx, h), ctx.scale_bias(scale, 1.0, 1.0)), shift)
        h = out_conv.forward(ctx, ctx.silu(h))
        return ctx.add(x, h)  # skip_connection is the identity: out_channels == channels


class DiffusionLayer:
    def __init__(self, weights: Mapping[str, Tensor], prefix: str, model_channels: int, num_heads: int,
                 num_buckets: int, max_distance: int, fused: bool = False):
        self.resblk = ResBlock(weights, prefix + ".resblk", model_channels, model_channels)
        self.attn = AttentionBlock(weights, prefix + ".attn", model_channels, num_heads, num_buckets, max_distance,
                                   fused)

    def forward(self, ctx: Context, inputs: _Inputs, x: Tensor, time_emb: Tensor) -> Tensor:
        y = self.resblk.forward(ctx, x, time_emb)
        return self.attn.forward(ctx, inputs, y)


class DiffusionTts:
    """DiffusionTts on ggml: ``DiffusionTts(model_file, backend)`` with the weights of the model file's
    ``diffusion`` component (living in ``backend``'s memory; default: the model file's backend)."""

    def __init__(self, model_file, backend: pg.Backend | None = None, fused: bool | None = None):
        """``fused``: attention softmax with the relative position bias by tortoise-ggml's CPU kernel
        (tortoise_ggml/kernels); None (default) wherever it can run, False never, True insists."""
        hp = model_file.hparams(COMPONENT)
        missing = [k for k in HPARAMS if k not in hp]
        if missing:
            raise ValueError(f"the model file lacks diffusion hyperparameters {missing}")
        w = model_file.weights(COMPONENT)
        self.model_file = model_file  # owns the buffer the weights live in: keep it alive as long as we are
        self.backend = backend or model_file.backend
        self.in_channels = c_in = int(hp["in_channels"])
        self.model_channels = c = int(hp["model_channels"])
        self.out_channels = int(hp["out_channels"])
        self.in_latent_channels = int(hp["in_latent_channels"])
        self.in_tokens = int(hp["in_tokens"])
        self.num_heads = heads = int(hp["num_heads"])
        self.num_layers = int(hp["num_layers"])
        self.fused = kernels.choose(
            fused, kernels.usable(self.backend), f"the fused attention kernel cannot run on the "
            f"{self.backend.kind} backend (kernels {'built' if kernels.available() else 'missing'})")
        rp = (int(hp["relative_attention_num_buckets"]), int(hp["relative_attention_max_distance"]), self.fused)

        def attention_block(prefix, channels=c):
            return AttentionBlock(w, prefix, channels, heads, *rp)

        self.inp_block = Conv1d(w, "inp_block", c_in, c, 3, padding=1)
        self.time_embed = (Linear(w, "time_embed.0"), Linear(w, "time_embed.2"))   # Linear, SiLU, Linear
        self.code_embedding = w["code_embedding.weight"]                            # ne (C, in_tokens)
        self.code_converter = [attention_block(f"code_converter.{i}") for i in range(3)]
        self.code_norm = GroupNorm32(w, "code_norm", c)
        self.latent_conditioner = (Conv1d(w, "latent_conditioner.0", self.in_latent_channels, c, 3, padding=1),
                                   [attention_block(f"latent_conditioner.{i}") for i in range(1, 5)])
        self.contextual_embedder = (Conv1d(w, "contextual_embedder.0", c_in, c, 3, stride=2, padding=1),
                                    Conv1d(w, "contextual_embedder.1", c, 2 * c, 3, stride=2, padding=1),
                                    [attention_block(f"contextual_embedder.{i}", 2 * c) for i in range(2, 7)])
        self.unconditioned_embedding = w["unconditioned_embedding"]                 # ne (1, C, 1)
        self.conditioning_timestep_integrator = [
            DiffusionLayer(w, f"conditioning_timestep_integrator.{i}", c, heads, *rp) for i in range(3)]
        self.integrating_conv = Conv1d(w, "integrating_conv", 2 * c, c, 1)
        self.mel_head = Conv1d(w, "mel_head", c, c_in, 3, padding=1)
        self.layers = ([DiffusionLayer(w, f"layers.{i}", c, heads, *rp) for i in range(self.num_layers)]
                       + [ResBlock(w, f"layers.{i}", c, c) for i in range(self.num_layers, self.num_layers + 3)])
        self.out = (GroupNorm32(w, "out.0", c), Conv1d(w, "out.2", c, self.out_channels, 3, padding=1))
        self._step = None  # the forward graph of the last input shape, with its context and inputs
        self._unconditioned_cache = None
        self.last_graph_nodes = 0

    # -- graphs -------------------------------------------------------------------------------------------------
    def _compute(self, ctx: Context, inputs: _Inputs, *outputs: Tensor) -> Graph:
        graph = Graph(ctx, *outputs)
        self.backend.compute(graph, inputs.feed)
        self.last_graph_nodes = graph.n_nodes
        return graph

    def _time_embed(self, ctx: Context, timesteps: Tensor) -> Tensor:
        first, second = self.time_embed
        emb = timestep_embedding(ctx, timesteps, self.model_channels)
        return second.forward(ctx, ctx.silu(first.forward(ctx, emb)))

    def _forward_graph(self, ctx: Context, inputs: _Inputs, x: Tensor, timesteps: Tensor,
                       code_emb: Tensor) -> Tensor:
        """forward on x ne (L, in_channels, B), timesteps ne (B,), code_emb ne (L, C, B) -> ne (L, out, B)."""
        time_emb = self._time_embed(ctx, timesteps)
        for layer in self.conditioning_timestep_integrator:
            code_emb = layer.forward(ctx, inputs, code_emb, time_emb)
        x = self.inp_block.forward(ctx, x)
        x = ctx.concat(x, code_emb, 1)
        x = self.integrating_conv.forward(ctx, x)
        for lyr in self.layers:
            x = (lyr.forward(ctx, inputs, x, time_emb) if isinstance(lyr, DiffusionLayer)
                 else lyr.forward(ctx, x, time_emb))
        out_norm, out_conv = self.out
        return out_conv.forward(ctx, ctx.silu(out_norm.forward(ctx, x)))

    # -- the reference's methods (numpy in and out) ------------------------------------------------------------
    def get_conditioning(self, conditioning_input) -> np.ndarray:
        """Diffusion conditioning latent (B, 2*model_channels) from mels (B, in_channels, T) or several clips
        (B, clips, in_channels, T): the contextual embedder's output, averaged over the frames of all clips."""
        cond = np.asarray(conditioning_input)
        if cond.ndim == 3:
            cond = cond[:, None]
        cond = _floats(cond, "conditioning_input", 4)
        b, clips, ch, t = cond.shape
        if ch != self.in_channels:
            raise ValueError(f"conditioning_input has {ch} mel channels (shape {cond.shape}), the model takes "
                             f"{self.in_channels}")
        # every clip runs through the embedder on its own: batching the clips gives the same result
        ctx = Context()
        inputs = _Inputs(ctx)
        h = inputs.add(cond.reshape(b * clips, ch, t))
        conv0, conv1, blocks = self.contextual_embedder
        h = conv1.forward(ctx, conv0.forward(ctx, h))
        for block in blocks:
            h = block.forward(ctx, inputs, h)
        self._compute(ctx, inputs, h)
        out = h.get().reshape(b, clips, h.ne[1], h.ne[0])                          # (B, clips, 2C, T')
        # torch.cat over time, then the mean over all frames
        return out.transpose(0, 2, 1, 3).reshape(b, h.ne[1], -1).mean(axis=-1, dtype=np.float32)

    def timestep_independent(self, aligned_conditioning, conditioning_latent, expected_seq_len: int,
                             return_code_pred: bool = False):
        """The conditioning embedding, stretched to ``expected_seq_len`` frames: (B, model_channels, L).

        ``aligned_conditioning``: AR latents (B, S, in_latent_channels) float (what tortoise/api.py passes) or AR
        codes (B, S) int. ``conditioning_latent``: (B, 2*model_channels) from get_conditioning. With
        ``return_code_pred`` also returns the mel_head's mel prediction (B, in_channels, L)."""
        aligned = np.asarray(aligned_conditioning)
        if is_latent(aligned):
            aligned = _floats(aligned, "aligned_conditioning (latents)", 3)
            if aligned.shape[2] != self.in_latent_channels:
                raise ValueError(f"latents have {aligned.shape[2]} channels (shape {aligned.shape}), the model "
                                 f"takes {self.in_latent_channels}")
        elif is_sequence(aligned):
            if aligned.ndim != 2 or aligned.size == 0:
                raise ValueError(f"codes must be (batch, length), got shape {aligned.shape}")
            if aligned.min() < 0 or aligned.max() >= self.in_tokens:
                raise ValueError(f"codes must lie in [0, {self.in_tokens}), got values in "
                                 f"[{aligned.min()}, {aligned.max()}]")
        else:
            raise TypeError(f"aligned_conditioning must be float latents or integer codes, got dtype {aligned.dtype}")
        b, s = aligned.shape[:2]
        cond = _floats(conditioning_latent, "conditioning_latent", 2)
        if cond.shape != (b, 2 * self.model_channels):
            raise ValueError(f"conditioning_latent must be ({b}, {2 * self.model_channels}), got shape {cond.shape}")
        if int(expected_seq_len) != expected_seq_len or expected_seq_len < 1:
            raise ValueError(f"expected_seq_len must be a positive integer, got {expected_seq_len!r}")
        expected_seq_len = int(expected_seq_len)

        c = self.model_channels
        ctx = Context()
        inputs = _Inputs(ctx)
        if is_latent(aligned):
            conv, blocks = self.latent_conditioner
            code_emb = conv.forward(ctx, inputs.add(np.ascontiguousarray(aligned.transpose(0, 2, 1))))
        else:
            ids = inputs.add(aligned.astype(np.int32).reshape(-1), "i32")
            rows = ctx.reshape(ctx.get_rows(self.code_embedding, ids), c, s, b)      # ne (C, S, B)
            code_emb, blocks = _seq(ctx, rows), self.code_converter
        for block in blocks:
            code_emb = block.forward(ctx, inputs, code_emb)
        # torch.chunk(conditioning_latent, 2, dim=1): scale, shift, each broadcast over the frames
        cond_scale = inputs.add(cond[:, :c].reshape(b, c, 1))
        cond_shift = inputs.add(cond[:, c:].reshape(b, c, 1))
        code_emb = ctx.add(ctx.mul(self.code_norm.forward(ctx, code_emb), ctx.scale_bias(cond_scale, 1.0, 1.0)),
                           cond_shift)
        self._compute(ctx, inputs, code_emb)
        code_emb = code_emb.get().reshape(b, c, s)
        expanded_code_emb = np.ascontiguousarray(code_emb[:, :, nearest_indices(s, expected_seq_len)])
        if not return_code_pred:
            return expanded_code_emb
        ctx = Context()
        inputs = _Inputs(ctx)
        mel_pred = self.mel_head.forward(ctx, inputs.add(expanded_code_emb))
        self._compute(ctx, inputs, mel_pred)
        return expanded_code_emb, mel_pred.get().reshape(b, self.in_channels, expected_seq_len)

    def forward(self, x, timesteps, aligned_conditioning=None, conditioning_latent=None,
                precomputed_aligned_embeddings=None, conditioning_free=False) -> np.ndarray:
        """The model's output (B, out_channels, L) for noisy mels ``x`` (B, in_channels, L) at ``timesteps`` (B,)
        (the original 0..3999 scale).

        Conditioning: ``precomputed_aligned_embeddings`` (B, model_channels, L) from timestep_independent, or
        ``aligned_conditioning`` + ``conditioning_latent`` (computed here). ``conditioning_free``: True replaces
        the conditioning by the learned unconditioned embedding; a sequence of B bools does so per entry, which is
        how one graph computes both halves of conditioning-free guidance."""
        x = _floats(x, "x", 3)
        b, ch, length = x.shape
        if ch != self.in_channels:
            raise ValueError(f"x has {ch} channels (shape {x.shape}), the model takes {self.in_channels}")
        ts = np.asarray(timesteps)
        if ts.ndim == 0:
            ts = np.full((b,), ts)
        if ts.shape != (b,) or ts.dtype.kind not in "iuf":
            raise ValueError(f"timesteps must be {b} numbers, got {ts.dtype} of shape {ts.shape}")
        free = np.asarray(conditioning_free)
        if free.dtype != bool or free.shape not in ((), (b,)):
            raise ValueError(f"conditioning_free must be a bool or {b} bools, got {conditioning_free!r}")
        free = np.broadcast_to(free, (b,))
        code_emb = np.empty((b, self.model_channels, length), dtype=np.float32)
        if not free.all():
            if precomputed_aligned_embeddings is None:
                if aligned_conditioning is None or conditioning_latent is None:
                    raise ValueError("forward needs precomputed_aligned_embeddings or aligned_conditioning and "
                                     "conditioning_latent")
                pre = self.timestep_independent(aligned_conditioning, conditioning_latent, length)
            else:
                pre = _floats(precomputed_aligned_embeddings, "precomputed_aligned_embeddings", 3)
            if pre.shape != (b, self.model_channels, length):
                raise ValueError(f"the aligned embeddings are {pre.shape}, expected {(b, self.model_channels, length)}")
            code_emb[~free] = pre[~free]
        if free.any():
            code_emb[free] = self._unconditioned()
        return self._run_step(x, ts.astype(np.float32), code_emb)

    __call__ = forward

    def _unconditioned(self) -> np.ndarray:
        """unconditioned_embedding as (1, C, 1), to broadcast over the frames (read from the backend once)."""
        if self._unconditioned_cache is None:
            self._unconditioned_cache = self.unconditioned_embedding.get().reshape(1, self.model_channels, 1)
        return self._unconditioned_cache

    def _run_step(self, x: np.ndarray, ts: np.ndarray, code_emb: np.ndarray) -> np.ndarray:
        key = x.shape
        if self._step is None or self._step[0] != key:
            self._step = None  # drop the old graph before building the next
            ctx = Context()
            inputs = _Inputs(ctx)
            tx, tt, tc = inputs.add(x), inputs.add(ts), inputs.add(code_emb)
            out = self._forward_graph(ctx, inputs, tx, tt, tc)
            self._step = (key, ctx, Graph(ctx, out), inputs, (tx, tt, tc), out)
        _, _, graph, inputs, (tx, tt, tc), out = self._step
        inputs.feed.update({tx: x, tt: ts, tc: code_emb})
        self.backend.compute(graph, inputs.feed)
        self.last_graph_nodes = graph.n_nodes
        return out.get().reshape(x.shape[0], self.out_channels, x.shape[2])


__all__ = ["DiffusionTts", "DiffusionLayer", "ResBlock", "AttentionBlock", "RelativePositionBias",
           "timestep_embedding", "nearest_indices", "relative_position_buckets", "output_seq_len"]
