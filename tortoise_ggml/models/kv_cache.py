"""A GPT-2 key/value cache in backend memory (HF's ``past_key_values``), written in place by the graphs.

Each layer holds K and V as ne (n_embd, capacity, n_rows): one row of n_embd = heads * head_dim values per cached
position, heads side by side as GPT-2's c_attn lays them out. Graphs write new positions with ggml_set_rows (which
converts F32 to the cache type) and read a strided 4-D view (head_dim, capacity, heads, n_rows) that
ggml_flash_attn_ext takes directly; unused slots are masked with -inf, which the CPU kernel skips.
"""
from __future__ import annotations

import pyggml as pg
from pyggml import Context, Tensor

CACHE_TYPES = ("f32", "f16")


class KVCache:
    def __init__(self, backend: pg.Backend, n_layer: int, n_embd: int, n_head: int, capacity: int, n_rows: int,
                 type: str = "f32"):
        if type not in CACHE_TYPES:
            raise ValueError(f"KV cache type must be one of {CACHE_TYPES}, got {type!r}")
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not a multiple of n_head={n_head}")
        if capacity < 1 or n_rows < 1:
            raise ValueError(f"KV cache needs capacity >= 1 and n_rows >= 1, got {capacity}, {n_rows}")
        self.n_layer, self.n_embd, self.n_head = n_layer, n_embd, n_head
        self.capacity, self.n_rows, self.type = capacity, n_rows, type
        self.ctx = Context(max_tensors=2 * n_layer + 1, graph_size=0)
        self.k = [self.ctx.new_tensor(type, (n_embd, capacity, n_rows), f"cache_k{i}") for i in range(n_layer)]
        self.v = [self.ctx.new_tensor(type, (n_embd, capacity, n_rows), f"cache_v{i}") for i in range(n_layer)]
        self.buffer = backend.alloc_tensors(self.ctx)
        # the CPU kernel skips masked slots, but GPU kernels weight them by 0, and 0 * NaN garbage is NaN
        self.buffer.clear(0)

    @property
    def nbytes(self) -> int:
        return self.buffer.size

    def fits(self, n_layer: int, n_embd: int, n_head: int, capacity: int, n_rows: int, type: str) -> bool:
        return (self.n_layer, self.n_embd, self.n_head, self.n_rows, self.type) == (
            n_layer, n_embd, n_head, n_rows, type) and self.capacity >= capacity

    def store(self, ctx: Context, layer: int, k_cur: Tensor, v_cur: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Write k_cur, v_cur (ne (n_embd, n_new, n_rows or 1)) at positions ``slots`` (I32, ne (n_new,)) of
        every row; a single row is broadcast to all rows (a prefix shared by every sample). The AR decode step
        relies on that: the prefix positions are read from row 0 for every row (kernels.attend_cache's
        ``shared``), so anything that writes per-row data below the prefix (per-row prompts, reordered rows) must
        stop passing it.

        Returns the whole cache of this layer as (head_dim, capacity, heads, n_rows) views that depend on the
        writes, so an attention reading them runs after them.
        """
        out = []
        for cache, cur in ((self.k[layer], k_cur), (self.v[layer], v_cur)):
            if cur.ne[2] != self.n_rows:
                cur = ctx.repeat(cur, ctx.new_tensor("f32", (cur.ne[0], cur.ne[1], self.n_rows)))
            written = ctx.set_rows(cache, cur, slots)
            out.append(self.heads_view(ctx, written))
        return out[0], out[1]

    def heads_view(self, ctx: Context, t: Tensor) -> Tensor:
        d, es = self.n_embd // self.n_head, t.nb[0]
        return ctx.view(t, (d, self.capacity, self.n_head, self.n_rows),
                        (self.n_embd * es, d * es, self.n_embd * self.capacity * es))
