"""The x-transformers pieces Tortoise's CLVP and CVVP use (tortoise/models/xtransformers.py, tortoise-tts 3.0.0).

Only the configuration those models build is here: an ``Encoder`` (non-causal AttentionLayers) with pre-norm
RMSNorm, rotary position embedding, GEGLU feed-forward and plain residuals, inside a ContinuousTransformerWrapper
(no positional embedding, since rotary is on; identity projections; final LayerNorm). Every other option of the
reference (memory tokens, ALiBi, talking heads, ...) is absent, and the constructors take no switches for them.

Layout (tortoise_ggml.layers): sequence data ne (dim, T, B). Dropout is a no-op at inference, as is the reference's
all-true key mask in eval mode (see tortoise_ggml.models.clvp).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pyggml import Context, Tensor

from .. import layers

DEFAULT_DIM_HEAD = 64
# RotaryEmbedding's frequency base, a literal in the reference
ROTARY_BASE = 10000.0
# eps defaults of the reference's RMSNorm and of torch.nn.LayerNorm (ContinuousTransformerWrapper.norm)
RMS_NORM_EPS = 1e-8
LAYER_NORM_EPS = 1e-5


class CheckedWeights:
    """A component's weights under one key prefix, each checked against the shape the hyperparameters imply."""

    def __init__(self, weights: Mapping[str, Tensor], component: str, prefix: str = ""):
        self.weights, self.component, self.prefix = weights, component, prefix

    def sub(self, name: str) -> "CheckedWeights":
        return CheckedWeights(self.weights, self.component, f"{self.prefix}{name}.")

    def __call__(self, name: str, shape: tuple[int, ...]) -> Tensor:
        key = self.prefix + name
        try:
            t = self.weights[key]
        except KeyError:
            raise KeyError(f"{self.component} weight {key!r} is missing from the model file") from None
        # compare ne: the numpy shape of a ggml tensor drops leading unit dimensions
        if t.ne != tuple(reversed(shape)) + (1,) * (4 - len(shape)):
            raise ValueError(f"{self.component} weight {key!r} has ne {t.ne}, the hyperparameters say shape {shape}")
        return t


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
# norms
# ------------------------------------------------------------------------------------------------------------------
class RMSNorm:
    """x / max(||x|| * dim^-0.5, eps) * g."""

    def __init__(self, w: CheckedWeights, dim: int, eps: float = RMS_NORM_EPS):
        self.scale = dim ** -0.5
        self.eps = eps
        self.g = w("g", (dim,))

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        # max(||x|| s, eps) = s max(||x||, eps / s), so the reference's clamp is exactly ggml's l2_norm eps
        y = ctx.l2_norm(x, self.eps / self.scale)
        return ctx.mul(ctx.scale(y, 1.0 / self.scale), self.g)


class LayerNorm:
    def __init__(self, w: CheckedWeights, dim: int, eps: float = LAYER_NORM_EPS):
        self.weight, self.bias = w("weight", (dim,)), w("bias", (dim,))
        self.eps = eps

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        return layers.layer_norm(ctx, x, self.weight, self.bias, self.eps)


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

    def __init__(self, w: CheckedWeights, dim_in: int, dim_out: int):
        self.weight = w("weight", (dim_out * 2, dim_in))
        self.bias = w("bias", (dim_out * 2,))

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        return ctx.geglu_erf(layers.linear(ctx, x, self.weight, self.bias), swapped=True)


class FeedForward:
    """net = Sequential(GLU(dim, inner_dim), Identity, Dropout, Linear(inner_dim, dim)): keys net.0 and net.3."""

    def __init__(self, w: CheckedWeights, dim: int, mult: int):
        inner_dim = int(dim * mult)
        self.project_in = GLU(w.sub("net.0.proj"), dim, inner_dim)
        self.weight = w("net.3.weight", (dim, inner_dim))
        self.bias = w("net.3.bias", (dim,))

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        return layers.linear(ctx, self.project_in.forward(ctx, x), self.weight, self.bias)


# ------------------------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------------------------
class Attention:
    """Self-attention without masks (an encoder with the reference's all-true eval mask), rotary on q, k and v."""

    def __init__(self, w: CheckedWeights, dim: int, dim_head: int = DEFAULT_DIM_HEAD, heads: int = 8):
        self.scale = dim_head ** -0.5
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.to_q = w("to_q.weight", (inner, dim))
        self.to_k = w("to_k.weight", (inner, dim))
        self.to_v = w("to_v.weight", (inner, dim))
        self.to_out = (w("to_out.weight", (dim, inner)), w("to_out.bias", (dim,)))

    def forward(self, ctx: Context, x: Tensor, rotary_pos_emb: RotaryPosEmb | None = None) -> Tensor:
        t, b = x.ne[1], x.ne[2]

        def heads(w: Tensor) -> Tensor:
            # 'b n (h d) -> b h n d', kept as ne (d, h, n, b) here: the rope op wants positions on ne[2]
            return ctx.reshape(layers.linear(ctx, x, w), self.dim_head, self.heads, t, b)

        q, k, v = heads(self.to_q), heads(self.to_k), heads(self.to_v)
        if rotary_pos_emb is not None:
            q, k, v = (apply_rotary_pos_emb(ctx, u, rotary_pos_emb) for u in (q, k, v))
        q, k, v = (ctx.permute(u, 0, 2, 1, 3) for u in (q, k, v))   # ne (d, n, h, b)
        out = layers.attention(ctx, q, k, v, None, self.scale)       # 'b h n d -> b n (h d)': ne (h*d, n, b)
        return layers.linear(ctx, out, *self.to_out)


class AttentionLayers:
    """depth x (pre-RMSNorm attention + residual, pre-RMSNorm feed-forward + residual); layer types 'a', 'f'
    alternate, so layer 2i is attention and 2i+1 feed-forward. Keys: layers.{i}.0.0.g (the pre-branch norm),
    layers.{i}.1{wrap}.* (the block; ``wrap`` is ".wrap" where CLVP's CheckpointedLayer wraps it)."""

    def __init__(self, w: CheckedWeights, dim: int, depth: int, heads: int, dim_head: int = DEFAULT_DIM_HEAD,
                 ff_mult: int = 4, rotary_emb_dim: int | None = None, wrap: str = ""):
        self.dim, self.depth = dim, depth
        self.layer_types = ("a", "f") * depth
        rotary_emb_dim = max(rotary_emb_dim if rotary_emb_dim is not None else dim_head // 2, 32)
        if rotary_emb_dim > dim_head:
            raise ValueError(f"rotary embedding dim {rotary_emb_dim} exceeds the head size {dim_head}")
        inv_freq = w.weights.get(f"{w.prefix}rotary_pos_emb.inv_freq")
        self.rotary_pos_emb = RotaryEmbedding(rotary_emb_dim, inv_freq.get() if inv_freq is not None else None)
        self.layers = []
        for ind, layer_type in enumerate(self.layer_types):
            lw = w.sub(f"layers.{ind}")
            if layer_type == "a":
                layer = Attention(lw.sub(f"1{wrap}"), dim, dim_head=dim_head, heads=heads)
            else:
                layer = FeedForward(lw.sub(f"1{wrap}"), dim, mult=ff_mult)
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

    def __init__(self, w: CheckedWeights, attn_layers: AttentionLayers):
        self.attn_layers = attn_layers
        self.norm = LayerNorm(w.sub("norm"), attn_layers.dim)

    def forward(self, ctx: Context, x: Tensor, positions: Tensor) -> Tensor:
        """x: ne (dim, T, B); positions: I32 ne (T) holding 0..T-1."""
        x = self.attn_layers.forward(ctx, x, positions)
        return self.norm.forward(ctx, x)


def encoder_from_hparams(w: CheckedWeights, dim: int, depth: int, heads: int, hp: Mapping, wrap: str = ""
                         ) -> ContinuousTransformerWrapper:
    """A ContinuousTransformerWrapper(Encoder(...)) under ``w`` (the wrapper's prefix), with dim_head, ff_mult and
    rotary_emb_dim from the component's hyperparameters ``hp``."""
    attn = Encoder(w.sub("attn_layers"), dim, depth, heads, dim_head=int(hp["dim_head"]), ff_mult=int(hp["ff_mult"]),
                   rotary_emb_dim=int(hp["rotary_emb_dim"]), wrap=wrap)
    return ContinuousTransformerWrapper(w, attn)


__all__ = ["DEFAULT_DIM_HEAD", "CheckedWeights", "RotaryEmbedding", "apply_rotary_pos_emb", "RMSNorm", "LayerNorm",
           "GLU", "FeedForward", "Attention", "AttentionLayers", "Encoder", "ContinuousTransformerWrapper",
           "encoder_from_hparams"]
