"""HF transformers' GPT-2 (transformers/models/gpt2/modeling_gpt2.py, 4.31) as ggml graph blocks, as Tortoise's
UnifiedVoice uses it: token and position embeddings are computed by the caller (``wte`` unused, ``wpe`` null), so
GPT2Model takes ``inputs_embeds``. Sequence data is ne (n_embd, T, B).

The weights are the converter's: every Conv1D weight is stored (out, in) like a Linear's, so each is one mul_mat.
"""
from __future__ import annotations

import math

from pyggml import Context, Tensor

from .. import kernels
from . import layers
from .arch_util import LayerNorm, Linear, ModuleWeights
from .kv_cache import KVCache


def Conv1D(w: ModuleWeights, nx: int, nf: int) -> Linear:
    """GPT-2's Conv1D(nf, nx): a Linear whose weight torch stores transposed; the converter stored it (nf, nx)."""
    return Linear(w, nx, nf)


class GPT2Attention:
    def __init__(self, w: ModuleWeights, n_embd: int, n_head: int, fused: bool = False):
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not a multiple of n_head={n_head}")
        self.c_attn = Conv1D(w.sub("c_attn"), n_embd, 3 * n_embd)
        self.c_proj = Conv1D(w.sub("c_proj"), n_embd, n_embd)
        self.n_embd, self.n_head, self.fused = n_embd, n_head, fused
        self.head_dim = n_embd // n_head

    def _split(self, ctx: Context, qkv: Tensor, which: int, heads: bool) -> Tensor:
        """q, k or v (which = 0, 1, 2) out of c_attn's ne (3*n_embd, T, B) output, without a copy: as heads
        (head_dim, T, heads, B), or as rows (n_embd, T, B) for the cache."""
        d3, t, b = qkv.ne[0], qkv.ne[1], qkv.ne[2]
        es, off = qkv.nb[0], which * self.n_embd * qkv.nb[0]
        if heads:
            return ctx.view(qkv, (self.head_dim, t, self.n_head, b), (d3 * es, self.head_dim * es, d3 * t * es), off)
        return ctx.view(qkv, (self.n_embd, t, b), (d3 * es, d3 * t * es), off)

    def forward(self, ctx: Context, hidden_states: Tensor, mask: Tensor, layer_past: "LayerPast | None" = None
                ) -> Tensor:
        """Causal self-attention. ``mask``: F16 ne (T_kv, T) of 0 / -inf. With ``layer_past`` the new keys and
        values are written to the cache; queries attend to the whole cache when ``layer_past.attend_cache``
        (decode), else to this call's keys and values (prefill)."""
        qkv = self.c_attn.forward(ctx, hidden_states, self.fused)
        query = self._split(ctx, qkv, 0, heads=True)
        key = self._split(ctx, qkv, 1, heads=True)
        value = self._split(ctx, qkv, 2, heads=True)
        if layer_past is not None:
            k_all, v_all = layer_past.cache.store(ctx, layer_past.layer, self._split(ctx, qkv, 1, heads=False),
                                                  self._split(ctx, qkv, 2, heads=False), layer_past.slots)
            if layer_past.attend_cache:
                key, value = k_all, v_all
                if layer_past.fused:  # one query per row: tortoise-ggml's CPU kernel reads the cache in order
                    out = kernels.attend_cache(ctx, query, key, value, mask, 1.0 / math.sqrt(self.head_dim),
                                               layer_past.shared)
                    return self.c_proj.forward(ctx, ctx.reshape(out, self.n_embd, 1, out.ne[3]), self.fused)
            else:
                layer_past.writes += [k_all, v_all]
        attn_output = layers.attention(ctx, query, key, value, mask, 1.0 / math.sqrt(self.head_dim))
        return self.c_proj.forward(ctx, attn_output, self.fused)


class GPT2MLP:
    def __init__(self, w: ModuleWeights, n_embd: int, intermediate_size: int, fused: bool = False):
        self.c_fc = Conv1D(w.sub("c_fc"), n_embd, intermediate_size)
        self.c_proj = Conv1D(w.sub("c_proj"), intermediate_size, n_embd)
        self.fused = fused

    def forward(self, ctx: Context, hidden_states: Tensor) -> Tensor:
        # GPT-2's gelu_new is ggml_gelu: this project's ggml computes it exactly (vendor/ggml/patches/0002)
        h = ctx.gelu(self.c_fc.forward(ctx, hidden_states, self.fused))
        return self.c_proj.forward(ctx, h, self.fused)


class GPT2Block:
    def __init__(self, w: ModuleWeights, n_embd: int, n_head: int, eps: float, fused: bool = False):
        self.ln_1 = LayerNorm(w.sub("ln_1"), n_embd, eps)
        self.attn = GPT2Attention(w.sub("attn"), n_embd, n_head, fused)
        self.ln_2 = LayerNorm(w.sub("ln_2"), n_embd, eps)
        self.mlp = GPT2MLP(w.sub("mlp"), n_embd, 4 * n_embd, fused)

    def forward(self, ctx: Context, hidden_states: Tensor, mask: Tensor, layer_past: "LayerPast | None" = None
                ) -> Tensor:
        attn_output = self.attn.forward(ctx, self.ln_1.forward(ctx, hidden_states), mask, layer_past)
        hidden_states = ctx.add(attn_output, hidden_states)
        feed_forward_hidden_states = self.mlp.forward(ctx, self.ln_2.forward(ctx, hidden_states))
        return ctx.add(hidden_states, feed_forward_hidden_states)


class LayerPast:
    """One layer's view of a KVCache for one graph: where this call's positions go (``slots``), and whether the
    queries read the cache (decode) or only fill it (prefill; the writes are collected in ``writes`` so the caller
    can make them graph outputs)."""

    def __init__(self, cache: KVCache, layer: int, slots: Tensor, attend_cache: bool, writes: list,
                 fused: bool = False, shared: Tensor | None = None):
        self.cache, self.layer, self.slots, self.attend_cache, self.writes = cache, layer, slots, attend_cache, writes
        self.fused = fused  # attend with tortoise_ggml.kernels.attend_cache (the caller checked it can run)
        self.shared = shared  # I32 (1,): leading positions every row holds alike (kernels.attend_cache)


class GPT2Model:
    def __init__(self, w: ModuleWeights, n_layer: int, n_embd: int, n_head: int, layer_norm_epsilon: float,
                 fused: bool = False):
        """``fused``: Q8_0 products in tortoise-ggml's CPU kernel (kernels.q8_matmul) where the weight fits."""
        self.n_layer, self.n_embd, self.n_head = n_layer, n_embd, n_head
        self.h = [GPT2Block(w.sub(f"h.{i}"), n_embd, n_head, layer_norm_epsilon, fused) for i in range(n_layer)]
        self.ln_f = LayerNorm(w.sub("ln_f"), n_embd, layer_norm_epsilon)

    def blocks(self, ctx: Context, inputs_embeds: Tensor, mask: Tensor, cache: KVCache | None = None,
               slots: Tensor | None = None, attend_cache: bool = False, writes: list | None = None,
               fused: bool = False, shared: Tensor | None = None) -> Tensor:
        """The transformer stack before ln_f (callers that need only some positions apply ln_f to those).
        ``fused``: decode attention with tortoise_ggml.kernels.attend_cache (see ``fused_attention_usable``)."""
        if inputs_embeds.ne[0] != self.n_embd:
            raise ValueError(f"inputs_embeds {inputs_embeds!r} must have ne[0] = n_embd = {self.n_embd}")
        hidden_states = inputs_embeds
        for i, block in enumerate(self.h):
            past = None if cache is None else LayerPast(cache, i, slots, attend_cache, writes, fused, shared)
            hidden_states = block.forward(ctx, hidden_states, mask, past)
        return hidden_states

    def fused_attention_usable(self, backend, cache: KVCache) -> bool:
        """Whether decode steps on ``backend`` over ``cache`` can attend with the fused CPU kernel (F32 cache,
        head size a multiple of its vector width)."""
        return (cache.type == "f32" and kernels.usable(backend)
                and kernels.attend_cache_fits(self.n_embd // self.n_head, self.n_head))

    def forward(self, ctx: Context, inputs_embeds: Tensor, mask: Tensor) -> Tensor:
        """last_hidden_state of GPT2Model(inputs_embeds=...) without a cache."""
        return self.ln_f.forward(ctx, self.blocks(ctx, inputs_embeds, mask))
