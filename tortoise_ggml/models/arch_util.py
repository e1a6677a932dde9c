"""tortoise/models/arch_util.py: the blocks every model shares, written once (torch.nn's Linear, Conv1d, Embedding,
LayerNorm and arch_util's normalization / GroupNorm32, QKVAttentionLegacy, AttentionBlock), and the weights view
every block reads its tensors through.

Each block is built from a ``ModuleWeights`` view (the component's tensors under the block's key prefix, each
checked against the shape the config implies) and adds ops with ``forward(ctx, x, ...)``. Layouts are those of
tortoise_ggml.models.layers: sequence data ne (D, T, B), channel data ne (T, C, B).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import pyggml as pg
from pyggml import Context, Tensor

from .. import kernels
from . import layers

# torch.nn.GroupNorm's eps, which arch_util.normalization keeps
GROUP_NORM_EPS = 1e-5


class ModuleWeights:
    """A component's weights under one key prefix (``w.sub("attn")`` descends), each checked on access against
    the shape the config implies: a file whose tensors do not fit its metadata fails here, naming the key, not
    deep inside a graph."""

    def __init__(self, weights: Mapping[str, Tensor], component: str, prefix: str = ""):
        self.weights, self.component, self.prefix = weights, component, prefix

    def sub(self, name: str) -> ModuleWeights:
        return ModuleWeights(self.weights, self.component, f"{self.prefix}{name}.")

    def has(self, name: str) -> bool:
        return self.prefix + name in self.weights

    def __call__(self, name: str, *shapes: tuple[int, ...]) -> Tensor:
        """The tensor ``prefix + name``, whose numpy shape must be one of ``shapes`` (none given: any)."""
        key = self.prefix + name
        try:
            t = self.weights[key]
        except KeyError:
            raise KeyError(f"{self.component} weight {key!r} is missing from the model file") from None
        # compare ne: the numpy shape of a ggml tensor drops leading unit dimensions
        if shapes and not any(t.ne == tuple(reversed(s)) + (1,) * (4 - len(s)) for s in shapes):
            want = " or ".join(str(tuple(s)) for s in shapes)
            raise ValueError(f"{self.component} weight {key!r} has ne {t.ne}, the config says shape {want}")
        return t


def normalization(channels: int) -> int:
    """Group count of arch_util.normalization(channels), a GroupNorm32."""
    groups = 32
    if channels <= 16:
        groups = 8
    elif channels <= 64:
        groups = 16
    while channels % groups != 0:
        groups = int(groups / 2)
    if groups <= 2:
        raise ValueError(f"arch_util.normalization: {channels} channels give {groups} groups")
    return groups


# ------------------------------------------------------------------------------------------------------------------
# torch.nn
# ------------------------------------------------------------------------------------------------------------------
class Linear:
    """nn.Linear on sequence data ne (in, T, B) (or vectors ne (in, B)) -> ne (out, ...)."""

    def __init__(self, w: ModuleWeights, in_features: int, out_features: int, bias: bool = True):
        self.weight = w("weight", (out_features, in_features))
        self.bias = w("bias", (out_features,)) if bias else None
        self.in_features, self.out_features = in_features, out_features

    def forward(self, ctx: Context, x: Tensor, fused: bool = False) -> Tensor:
        """``fused``: Q8_0 products in tortoise-ggml's CPU kernel (layers.linear)."""
        return layers.linear(ctx, x, self.weight, self.bias, fused)


class Conv1d:
    """nn.Conv1d on channel data ne (T, C_in, B); the kernel as torch stores it (C_out, C_in, K), or flattened to
    (C_out, C_in*K) as f16/q8_0 files store large ones (registry: flat_convs)."""

    def __init__(self, w: ModuleWeights, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, bias: bool = True):
        self.weight = w("weight", (out_channels, in_channels, kernel_size), (out_channels, in_channels * kernel_size))
        self.bias = w("bias", (out_channels,)) if bias else None
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation

    @property
    def matrix(self) -> bool:
        """Whether the kernel is stored flattened (a matrix, possibly quantized)."""
        return self.weight.ne[:2] != (self.kernel_size, self.in_channels)

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        return layers.conv1d(ctx, x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                             kernel_size=self.kernel_size)

    def forward_sequence(self, ctx: Context, x: Tensor, residual: Tensor | None = None, fused: bool = False) -> Tensor:
        """The convolution on sequence data ne (C_in, T, B) -> ne (C_out, T, B) (+ ``residual``), for stride 1 and
        'same' padding: 1x1 convolutions without the two transposes a channel-data call costs, and with ``fused``
        (tortoise-ggml's CPU kernels) Q8_0 weights in kernels.q8_matmul (layers.conv1d_time_major)."""
        if self.stride != 1 or self.dilation != 1 or 2 * self.padding != self.kernel_size - 1:
            raise pg.ShapeError(f"forward_sequence takes a stride-1 'same' convolution, not kernel "
                                f"{self.kernel_size} stride {self.stride} padding {self.padding}")
        return layers.conv1d_time_major(ctx, x, self.weight, self.bias, self.kernel_size, fused, residual)


class Embedding:
    """nn.Embedding: rows of the table by id."""

    def __init__(self, w: ModuleWeights, num_embeddings: int, embedding_dim: int, name: str = "weight"):
        self.weight = w(name, (num_embeddings, embedding_dim))
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, ctx: Context, ids: Tensor) -> Tensor:
        """ids I32 ne (T, B) (or (N,)) -> ne (dim, T, B)."""
        t, b = ids.ne[0], ids.ne[1]
        rows = ctx.get_rows(self.weight, ctx.reshape(ids, t * b) if b > 1 else ids)
        return ctx.reshape(rows, self.embedding_dim, t, b) if b > 1 else rows


class LayerNorm:
    """nn.LayerNorm over ne[0]."""

    def __init__(self, w: ModuleWeights, dim: int, eps: float = 1e-5):
        self.weight, self.bias, self.eps = w("weight", (dim,)), w("bias", (dim,)), eps

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        return layers.layer_norm(ctx, x, self.weight, self.bias, self.eps)


class GroupNorm32:
    """arch_util.normalization(channels) on channel data ne (T, C, B)."""

    def __init__(self, w: ModuleWeights, channels: int):
        self.weight, self.bias = w("weight", (channels,)), w("bias", (channels,))
        self.groups = normalization(channels)

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        return layers.group_norm(ctx, x, self.weight, self.bias, self.groups, GROUP_NORM_EPS)

    def forward_sequence(self, ctx: Context, x: Tensor, emb: Tensor | None = None, silu: bool = False,
                         fused: bool = False) -> Tensor:
        """The norm on sequence data ne (C, T, B), then with ``emb`` ne (2C, B) (a ResBlock's scale | shift)
        ``* (1 + scale) + shift``, then SiLU if ``silu``. ``fused``: all of it in one pass (kernels.group_norm);
        otherwise ggml's group_norm, which normalizes channel data, between two transposes."""
        if fused:
            return kernels.group_norm(ctx, x if x.nb[0] == 4 else ctx.cont(x), self.weight, self.bias, self.groups,
                                      GROUP_NORM_EPS, emb, silu)
        y = layers.to_sequence(ctx, self.forward(ctx, layers.to_sequence(ctx, x)))
        if emb is not None:
            c, b, es = x.ne[0], emb.ne[1], emb.nb[0]
            # torch.chunk(emb_out, 2, dim=1), each as ne (C, 1, B) to broadcast over time
            scale = ctx.reshape(ctx.cont(ctx.view(emb, (c, b), (emb.nb[1],), 0)), c, 1, b)
            shift = ctx.reshape(ctx.cont(ctx.view(emb, (c, b), (emb.nb[1],), c * es)), c, 1, b)
            y = ctx.add(ctx.mul(y, ctx.scale_bias(scale, 1.0, 1.0)), shift)
        return ctx.silu(y) if silu else y


# ------------------------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------------------------
# tinyBLAS (ggml's fast CPU F32 products) takes row counts that are a multiple of 4 and contractions that are a
# multiple of its vector width (16 floats at most); ggml's fallback, a dot product per output, is ~5x slower.
# Attention with a relative position bias pads its keys to this multiple (qkv_attention_legacy).
KEY_STEP = 16


def qkv_attention_legacy(ctx: Context, qkv: Tensor, n_heads: int, rel_pos: Tensor | None = None,
                         rel_table: Tensor | None = None) -> Tensor:
    """QKVAttentionLegacy on sequence data qkv ne (H*3*ch, T, B), laid out head-major [h][q|k|v][ch] -> ne (H*ch, T, B).

    The reference scales q and k by ch^-1/4 each; one ch^-1/2 on the product is the same. Without a relative position
    bias this is fused flash attention; with one the bias enters the soft_max in F32, since flash attention would
    take it only as F16: as a mask ``rel_pos`` ne (T_keys, T, H), or as the per-distance table ``rel_table``
    ne (2T-1, H) that tortoise-ggml's CPU kernel reads directly (kernels.relpos_softmax). Keys past T (a mask wider
    than T, -inf there; always with the table) are zero padding, and the values too: the same result, with
    products whose sizes suit tinyBLAS.
    """
    width, t, b = qkv.ne[0], qkv.ne[1], qkv.ne[2]
    if width % (3 * n_heads):
        raise pg.ShapeError(f"qkv width {width} is not a multiple of 3 * {n_heads} heads")
    ch, es = width // (3 * n_heads), qkv.nb[0]
    ne, nb = (ch, t, n_heads, b), (width * es, 3 * ch * es, width * t * es)
    q = ctx.view(qkv, ne, nb, 0)                                               # ne (ch, T, H, B)
    k = ctx.view(qkv, ne, nb, ch * es)
    v = ctx.view(qkv, ne, nb, 2 * ch * es)
    if rel_pos is None and rel_table is None:
        return layers.attention(ctx, q, k, v, None, 1.0 / math.sqrt(ch))
    n_keys = t + -t % KEY_STEP if rel_table is not None else rel_pos.ne[0]
    if n_keys < t:
        raise pg.ShapeError(f"relative position mask {rel_pos!r} is narrower than the {t} keys")
    v_t = ctx.cont(ctx.permute(v, 1, 0, 2, 3))                                 # ne (T, ch, H, B)
    k = ctx.cont(k)
    if n_keys > t:  # zero keys (given no weight) and zero values
        v_t, k = ctx.pad(v_t, n_keys - t), ctx.pad(k, 0, n_keys - t)
    # with the table (tortoise-ggml's CPU kernels) both products are kernels.f32_matmul where it fits: tinyBLAS
    # splits these 64-deep products into small tiles that reread both operands (a q8_0 step: 0.59 -> 0.37 s)
    def product(a: Tensor, b: Tensor) -> Tensor:
        if rel_table is not None and kernels.f32_matmul_fits(a) and a.ne[2:] == b.ne[2:]:
            return kernels.f32_matmul(ctx, a, b if b.is_contiguous else ctx.cont(b))
        return ctx.mul_mat(a, b)

    scores = product(k, ctx.cont(q))                                           # ne (T_keys, T_q, H, B)
    if rel_table is not None:
        weight = kernels.relpos_softmax(ctx, scores, rel_table, t, 1.0 / math.sqrt(ch), inplace=True)
    else:
        weight = ctx.soft_max_ext(scores, rel_pos, 1.0 / math.sqrt(ch))
    a = product(v_t, weight)                                                   # ne (ch, T_q, H, B)
    return ctx.reshape(ctx.cont(ctx.permute(a, 0, 2, 1, 3)), ch * n_heads, t, b)


class AttentionBlock:
    """arch_util.AttentionBlock(channels, num_heads, relative_pos_embeddings) on channel data ne (T, C, B).

    With ``relative_pos_embeddings`` (the diffusion decoder's) the bias is xtransformers.RelativePositionBias,
    whose distance buckets come from the graph's ``inputs``; ``fused`` takes the softmax with the bias read from
    its per-distance table by tortoise-ggml's CPU kernel. Without (the AR conditioning encoder's, CVVP's) the
    attention is ggml's fused flash attention.
    """

    def __init__(self, w: ModuleWeights, channels: int, num_heads: int = 1, relative_pos_embeddings: bool = False,
                 num_buckets: int = 32, max_distance: int = 64, fused: bool = False):
        if channels % num_heads:
            raise ValueError(f"{w.prefix}: {channels} channels do not split into {num_heads} heads")
        self.num_heads, self.fused = num_heads, fused
        self.norm = GroupNorm32(w.sub("norm"), channels)
        self.qkv = Conv1d(w.sub("qkv"), channels, 3 * channels, 1)
        self.proj_out = Conv1d(w.sub("proj_out"), channels, channels, 1)
        self.relative_pos_embeddings = None
        if relative_pos_embeddings:
            from .xtransformers import RelativePositionBias
            self.relative_pos_embeddings = RelativePositionBias(
                w.sub("relative_pos_embeddings"), scale=(channels // num_heads) ** .5, heads=num_heads,
                num_buckets=num_buckets, max_distance=max_distance)

    def _attend(self, ctx: Context, qkv: Tensor, inputs: pg.Inputs | None, t: int) -> Tensor:
        """QKVAttentionLegacy with this block's relative position bias (if any): qkv ne (3C, T, B) -> ne (C, T, B)."""
        rel = self.relative_pos_embeddings
        if rel is None:
            return qkv_attention_legacy(ctx, qkv, self.num_heads)
        if self.fused:
            return qkv_attention_legacy(ctx, qkv, self.num_heads, rel_table=rel.per_distance(ctx, inputs, t))
        return qkv_attention_legacy(ctx, qkv, self.num_heads, rel.forward(ctx, inputs, t, t + -t % KEY_STEP))

    def forward(self, ctx: Context, x: Tensor, inputs: pg.Inputs | None = None) -> Tensor:
        qkv = self.qkv.forward_sequence(ctx, layers.to_sequence(ctx, self.norm.forward(ctx, x)))
        h = self.proj_out.forward_sequence(ctx, self._attend(ctx, qkv, inputs, x.ne[0]))
        return ctx.add(x, layers.to_sequence(ctx, h))

    def forward_sequence(self, ctx: Context, x: Tensor, inputs: pg.Inputs | None = None) -> Tensor:
        """The block on sequence data ne (C, T, B): no transposes; with ``fused`` the norm, the products (Q8_0
        weights) and the residual add in tortoise-ggml's CPU kernels."""
        f = self.fused
        qkv = self.qkv.forward_sequence(ctx, self.norm.forward_sequence(ctx, x, fused=f), fused=f)
        return self.proj_out.forward_sequence(ctx, self._attend(ctx, qkv, inputs, x.ne[1]), residual=x, fused=f)


__all__ = ["ModuleWeights", "normalization", "Linear", "Conv1d", "Embedding", "LayerNorm", "GroupNorm32",
           "qkv_attention_legacy", "AttentionBlock", "KEY_STEP", "GROUP_NORM_EPS"]
