"""The x-transformers pieces Tortoise's CLVP and CVVP use (tortoise/models/xtransformers.py, tortoise-tts 3.0.0).

Only the configuration those models build is here: an ``Encoder`` (non-causal AttentionLayers) with pre-norm
RMSNorm, rotary position embedding, GEGLU feed-forward and plain residuals, inside a ContinuousTransformerWrapper
(no positional embedding, since rotary is on; identity projections; final LayerNorm). Every other option of the
reference (memory tokens, ALiBi, talking heads, ...) is absent, and the constructors take no switches for them.

Layout (tortoise_ggml.layers): sequence data ne (dim, T, B). Dropout is a no-op at inference, as is the reference's
all-true key mask in eval mode (see tortoise_ggml.models.clvp).
"""
from __future__ import annotations

import math

import numpy as np

import pyggml as pg
from pyggml import Context, Tensor

from . import layers
from .arch_util import LayerNorm, Linear, ModuleWeights

DEFAULT_DIM_HEAD = 64
# RotaryEmbedding's frequency base, a literal in the reference
ROTARY_BASE = 10000.0
# eps defaults of the reference's RMSNorm and of torch.nn.LayerNorm (ContinuousTransformerWrapper.norm)
RMS_NORM_EPS = 1e-8
LAYER_NORM_EPS = 1e-5


# ------------------------------------------------------------------------------------------------------------------
# positional embeddings
# ------------------------------------------------------------------------------------------------------------------
class RotaryEmbedding:
    """The reference builds a table of angles t * inv_freq (n, dim); here the angles are left to ggml's rope op,
    which computes pos * ROTARY_BASE^(-2i/dim) itself, so the "embedding" is the positions tensor and the dim.

    ``inv_freq``: the checkpoint's buffer, when the model file has it; it must be the standard one, since the op
    cannot take other frequencies."""

    def __init__(self, dim: int, inv_freq: np.ndarray | None = None):
        if dim <= 0 or dim % 2:
            raise ValueError(f"rotary embedding dim must be even and positive, got {dim}")
        self.dim = dim
        if inv_freq is not None:
            want = 1.0 / (ROTARY_BASE ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
            inv_freq = np.asarray(inv_freq, dtype=np.float32).reshape(-1)
            if inv_freq.shape != want.shape or not np.allclose(inv_freq, want, rtol=1e-5, atol=0):
                raise ValueError(f"rotary inv_freq of the model file is not 1/{ROTARY_BASE:g}^(2i/{dim})")

    def forward(self, positions: Tensor) -> "RotaryPosEmb":
        """``positions``: I32 ne (T) holding 0..T-1 (the reference's ``arange(max_seq_len)``)."""
        return RotaryPosEmb(positions, self.dim)


class RotaryPosEmb:
    def __init__(self, positions: Tensor, dim: int):
        self.positions, self.dim = positions, dim


def apply_rotary_pos_emb(ctx: Context, t: Tensor, freqs: RotaryPosEmb) -> Tensor:
    """(t * cos) + (rotate_half(t) * sin) on the first ``freqs.dim`` channels of each head, the rest unchanged
    (the reference's split into t[..., :l] and t[..., l:], then cat).

    t: ne (dim_head, heads, T, B). rotate_half pairs channel i with channel i + dim/2, which is ggml's NeoX rope."""
    return ctx.rope_neox(t, freqs.positions, freqs.dim, ROTARY_BASE)


# ------------------------------------------------------------------------------------------------------------------
# relative position bias (the diffusion decoder's attention blocks)
# ------------------------------------------------------------------------------------------------------------------
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


def key_padding(n: int, n_keys: int) -> np.ndarray:
    """F32 (n_keys,): 0 for the n real keys, -inf for the padding after them (a soft_max mask row)."""
    row = np.zeros(n_keys, np.float32)
    row[n:] = -np.inf
    return row


class RelativePositionBias:
    """xtransformers.RelativePositionBias(scale, causal=False, num_buckets, max_distance, heads): a learned bias per
    head and distance bucket, added (times ``scale``) to the attention scores."""

    def __init__(self, w: ModuleWeights, scale: float, heads: int, num_buckets: int, max_distance: int):
        self.relative_attention_bias = w("relative_attention_bias.weight", (num_buckets, heads))  # ne (H, buckets)
        self.scale, self.heads = scale, heads
        self.num_buckets, self.max_distance = num_buckets, max_distance

    def per_distance(self, ctx: Context, inputs: pg.Inputs, n: int) -> Tensor:
        """The scaled bias per key - query distance, -(n-1) .. n-1: F32 ne (2n-1, heads)."""
        buckets = inputs.table(("buckets", n, self.num_buckets, self.max_distance),
                               lambda: relative_position_buckets(n, self.num_buckets, self.max_distance), "i32")
        per_distance = ctx.get_rows(self.relative_attention_bias, buckets)                       # ne (H, 2n-1)
        return ctx.scale(ctx.cont(ctx.transpose(per_distance)), self.scale)

    def forward(self, ctx: Context, inputs: pg.Inputs, n: int, n_keys: int | None = None) -> Tensor:
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
            bias = ctx.add(ctx.pad(bias, n_keys - n), inputs.table(("key_padding", n, n_keys),
                                                                   lambda: key_padding(n, n_keys)))
        return bias


# ------------------------------------------------------------------------------------------------------------------
# norms
# ------------------------------------------------------------------------------------------------------------------
class RMSNorm:
    """x / max(||x|| * dim^-0.5, eps) * g."""

    def __init__(self, w: ModuleWeights, dim: int, eps: float = RMS_NORM_EPS):
        self.scale = dim ** -0.5
        self.eps = eps
        self.g = w("g", (dim,))

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        # max(||x|| s, eps) = s max(||x||, eps / s), so the reference's clamp is exactly ggml's l2_norm eps
        y = ctx.l2_norm(x, self.eps / self.scale)
        return ctx.mul(ctx.scale(y, 1.0 / self.scale), self.g)


# ------------------------------------------------------------------------------------------------------------------
# residual
# ------------------------------------------------------------------------------------------------------------------
class Residual:
    def forward(self, ctx: Context, x: Tensor, residual: Tensor) -> Tensor:
        return ctx.add(x, residual)


# ------------------------------------------------------------------------------------------------------------------
# feedforward
# ------------------------------------------------------------------------------------------------------------------
class GLU:
    """``x, gate = proj(x).chunk(2); x * gelu(gate)`` with torch's exact (erf) GELU."""

    def __init__(self, w: ModuleWeights, dim_in: int, dim_out: int, fused: bool = False):
        self.weight = w("weight", (dim_out * 2, dim_in))
        self.bias = w("bias", (dim_out * 2,))
        self.fused = fused

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        return ctx.geglu_erf(layers.linear(ctx, x, self.weight, self.bias, self.fused), swapped=True)


class FeedForward:
    """net = Sequential(GLU(dim, inner_dim), Identity, Dropout, Linear(inner_dim, dim)): keys net.0 and net.3."""

    def __init__(self, w: ModuleWeights, dim: int, mult: int, fused: bool = False):
        inner_dim = int(dim * mult)
        self.project_in = GLU(w.sub("net.0.proj"), dim, inner_dim, fused)
        self.project_out = Linear(w.sub("net.3"), inner_dim, dim)
        self.fused = fused

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        return self.project_out.forward(ctx, self.project_in.forward(ctx, x), self.fused)


# ------------------------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------------------------
class Attention:
    """Self-attention without masks (an encoder with the reference's all-true eval mask), rotary on q, k and v."""

    def __init__(self, w: ModuleWeights, dim: int, dim_head: int = DEFAULT_DIM_HEAD, heads: int = 8,
                 fused: bool = False):
        self.scale = dim_head ** -0.5
        self.heads, self.dim_head, self.fused = heads, dim_head, fused
        inner = dim_head * heads
        self.to_q = Linear(w.sub("to_q"), dim, inner, bias=False)
        self.to_k = Linear(w.sub("to_k"), dim, inner, bias=False)
        self.to_v = Linear(w.sub("to_v"), dim, inner, bias=False)
        self.to_out = Linear(w.sub("to_out"), inner, dim)

    def forward(self, ctx: Context, x: Tensor, rotary_pos_emb: RotaryPosEmb | None = None) -> Tensor:
        t, b = x.ne[1], x.ne[2]

        def heads(proj: Linear) -> Tensor:
            # 'b n (h d) -> b h n d', kept as ne (d, h, n, b) here: the rope op wants positions on ne[2]
            return ctx.reshape(proj.forward(ctx, x, self.fused), self.dim_head, self.heads, t, b)

        q, k, v = heads(self.to_q), heads(self.to_k), heads(self.to_v)
        if rotary_pos_emb is not None:
            q, k, v = (apply_rotary_pos_emb(ctx, u, rotary_pos_emb) for u in (q, k, v))
        q, k, v = (ctx.permute(u, 0, 2, 1, 3) for u in (q, k, v))   # ne (d, n, h, b)
        out = layers.attention(ctx, q, k, v, None, self.scale)       # 'b h n d -> b n (h d)': ne (h*d, n, b)
        return self.to_out.forward(ctx, out, self.fused)


class AttentionLayers:
    """depth x (pre-RMSNorm attention + residual, pre-RMSNorm feed-forward + residual); layer types 'a', 'f'
    alternate, so layer 2i is attention and 2i+1 feed-forward. Keys: layers.{i}.0.0.g (the pre-branch norm),
    layers.{i}.1{wrap}.* (the block; ``wrap`` is ".wrap" where CLVP's CheckpointedLayer wraps it)."""

    def __init__(self, w: ModuleWeights, dim: int, depth: int, heads: int, dim_head: int = DEFAULT_DIM_HEAD,
                 ff_mult: int = 4, rotary_emb_dim: int | None = None, wrap: str = "", fused: bool = False):
        self.dim, self.depth = dim, depth
        self.layer_types = ("a", "f") * depth
        rotary_emb_dim = max(rotary_emb_dim if rotary_emb_dim is not None else dim_head // 2, 32)
        if rotary_emb_dim > dim_head:
            raise ValueError(f"rotary embedding dim {rotary_emb_dim} exceeds the head size {dim_head}")
        inv_freq = w("rotary_pos_emb.inv_freq").get() if w.has("rotary_pos_emb.inv_freq") else None
        self.rotary_pos_emb = RotaryEmbedding(rotary_emb_dim, inv_freq)
        self.layers = []
        for ind, layer_type in enumerate(self.layer_types):
            lw = w.sub(f"layers.{ind}")
            if layer_type == "a":
                layer = Attention(lw.sub(f"1{wrap}"), dim, dim_head=dim_head, heads=heads, fused=fused)
            else:
                layer = FeedForward(lw.sub(f"1{wrap}"), dim, mult=ff_mult, fused=fused)
            self.layers.append((RMSNorm(lw.sub("0.0"), dim), layer, Residual()))

    def forward(self, ctx: Context, x: Tensor, positions: Tensor) -> Tensor:
        rotary_pos_emb = self.rotary_pos_emb.forward(positions)
        for layer_type, (norm, block, residual_fn) in zip(self.layer_types, self.layers):
            residual = x
            x = norm.forward(ctx, x)
            if layer_type == "a":
                out = block.forward(ctx, x, rotary_pos_emb)
            else:
                out = block.forward(ctx, x)
            x = residual_fn.forward(ctx, out, residual)
        return x


class Encoder(AttentionLayers):
    """Non-causal AttentionLayers: the only kind CLVP and CVVP build."""


class ContinuousTransformerWrapper:
    """attn_layers then the final LayerNorm ``norm``; no positional embedding (rotary is on), no projections."""

    def __init__(self, w: ModuleWeights, attn_layers: AttentionLayers):
        self.attn_layers = attn_layers
        self.norm = LayerNorm(w.sub("norm"), attn_layers.dim, LAYER_NORM_EPS)

    def forward(self, ctx: Context, x: Tensor, positions: Tensor) -> Tensor:
        """x: ne (dim, T, B); positions: I32 ne (T) holding 0..T-1."""
        x = self.attn_layers.forward(ctx, x, positions)
        return self.norm.forward(ctx, x)


def encoder_from_config(w: ModuleWeights, dim: int, depth: int, heads: int, config, wrap: str = "",
                        fused: bool = False) -> ContinuousTransformerWrapper:
    """A ContinuousTransformerWrapper(Encoder(...)) under ``w`` (the wrapper's prefix), with dim_head, ff_mult and
    rotary_emb_dim from the component's config (CLVP's or CVVP's). ``fused``: Q8_0 products in tortoise-ggml's
    CPU kernel."""
    attn = Encoder(w.sub("attn_layers"), dim, depth, heads, dim_head=config.dim_head, ff_mult=config.ff_mult,
                   rotary_emb_dim=config.rotary_emb_dim, wrap=wrap, fused=fused)
    return ContinuousTransformerWrapper(w, attn)


__all__ = ["DEFAULT_DIM_HEAD", "RotaryEmbedding", "apply_rotary_pos_emb", "RMSNorm", "GLU", "FeedForward",
           "Attention", "AttentionLayers", "Encoder", "ContinuousTransformerWrapper", "encoder_from_config",
           "RelativePositionBias", "relative_position_buckets"]
