"""tortoise/models/arch_util.py: the pieces both the autoregressive conditioning encoder and the diffusion decoder use."""
from __future__ import annotations

import math

import pyggml as pg
from pyggml import Context, Tensor

from .. import kernels, layers


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
    scores = ctx.mul_mat(k, ctx.cont(q))                                       # ne (T_keys, T_q, H, B)
    if rel_table is not None:
        weight = kernels.relpos_softmax(ctx, scores, rel_table, t, 1.0 / math.sqrt(ch))
    else:
        weight = ctx.soft_max_ext(scores, rel_pos, 1.0 / math.sqrt(ch))
    a = ctx.mul_mat(v_t, weight)                                               # ne (ch, T_q, H, B)
    return ctx.reshape(ctx.cont(ctx.permute(a, 0, 2, 1, 3)), ch * n_heads, t, b)
