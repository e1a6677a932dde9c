"""Tortoise's autoregressive model (tortoise/models/autoregressive.py, tortoise-tts 3.0.0) on ggml.

UnifiedVoice mirrors the reference class: get_conditioning (the ConditioningEncoder over conditioning mels),
forward (teacher forced: text/mel logits and losses, or the latents api.py feeds the diffusion model) and
inference_speech (sampling N code sequences with a KV cache in backend memory, through GPT2InferenceModel).

Mel positions during generation (``mel_positions``):
  * "fixed" (default): the k-th generated code (k = 0, 1, ...) gets mel position k + 1, as in training
    (forward embeds [start_mel, c0, c1, ...] at positions 0, 1, 2, ...) and as the reference's non-cached path does.
  * "original": the k-th generated code gets position k + 2, as the reference's KV-cache path (api.py's default)
    does: GPT2InferenceModel.forward embeds a single new token at ``attention_mask.shape[1] - mel_len``, which
    counts the start_mel token already in the mask, so position 1 is never used. Use it to reproduce tortoise-tts.
Both modes give the start_mel token position 0.

Layouts follow tortoise_ggml.layers: sequence data ne (model_dim, T, B), channel data ne (T, C, B).
"""
from __future__ import annotations

import numpy as np

import pyggml as pg
from pyggml import Context, Graph, Tensor

from .. import kernels
from ..utils.checks import as_generator, floats, ids
from .arch_util import AttentionBlock, Conv1d, Embedding, LayerNorm, Linear, ModuleWeights
from .base import Model
from .gpt2 import GPT2Model
from .kv_cache import KVCache

MEL_POSITIONS = ("fixed", "original")

# ---------------------------------------------------------------------------------------------------------------
# graph helpers
# ---------------------------------------------------------------------------------------------------------------
def _get(t: Tensor) -> np.ndarray:
    """A tensor's data in its full 4-D numpy shape (Tensor.get drops trailing unit dims)."""
    return t.get().reshape(tuple(reversed(t.ne)))


def causal_mask(n: int) -> np.ndarray:
    """F16 (n, n) mask for flash attention: query i sees keys 0..i."""
    return np.triu(np.full((n, n), -np.inf, dtype=np.float16), 1)


def _cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """F.cross_entropy(logits (B, V, T), targets (B, T)), mean reduction."""
    lg = logits.astype(np.float64)
    m = lg.max(axis=1, keepdims=True)
    lse = np.log(np.exp(lg - m).sum(axis=1)) + m[:, 0]
    picked = np.take_along_axis(lg, targets[:, None, :].astype(np.int64), axis=1)[:, 0]
    return float((lse - picked).mean())


# ---------------------------------------------------------------------------------------------------------------
# tortoise/models/autoregressive.py
# ---------------------------------------------------------------------------------------------------------------
class ConditioningEncoder:
    def __init__(self, w: ModuleWeights, spec_dim: int, embedding_dim: int, attn_blocks: int, num_attn_heads: int):
        self.init = Conv1d(w.sub("init"), spec_dim, embedding_dim, 1)
        self.spec_dim, self.dim = spec_dim, embedding_dim
        self.attn = [AttentionBlock(w.sub(f"attn.{i}"), embedding_dim, num_attn_heads) for i in range(attn_blocks)]

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        """x: mels ne (T, spec_dim, B) -> ne (dim, B), frame 0 of the last block (mean=False)."""
        h = self.init.forward(ctx, x)
        for block in self.attn:
            h = block.forward(ctx, h)
        first = ctx.cont(ctx.view(h, (1, h.ne[1], h.ne[2]), (h.nb[1], h.nb[2])))
        return ctx.reshape(first, h.ne[1], h.ne[2])


class LearnedPositionEmbeddings:
    def __init__(self, w: ModuleWeights, seq_len: int, model_dim: int):
        self.emb = Embedding(w.sub("emb"), seq_len, model_dim)

    def forward(self, ctx: Context, inputs: pg.Inputs, sl: int) -> Tensor:
        """Positions 0..sl-1 -> ne (dim, sl, 1)."""
        return self.get_embeddings(ctx, inputs, np.arange(sl))

    def get_fixed_embedding(self, ctx: Context, inputs: pg.Inputs, ind: int) -> Tensor:
        return self.get_embeddings(ctx, inputs, np.array([ind]))

    def get_embeddings(self, ctx: Context, inputs: pg.Inputs, positions: np.ndarray) -> Tensor:
        positions = ids(positions, "position", self.emb.num_embeddings)
        return self.emb.forward(ctx, inputs.add(positions.reshape(1, -1), "i32"))


class GPT2InferenceModel:
    """The reference's GPT2InferenceModel with kv_cache=True, as HF generate drives it, restructured for one
    shared prefix: ``start`` prefills [cached_mel_emb | start_mel] once at batch 1 into a KV cache of N rows;
    each ``decode`` then embeds one new token per row and runs a single cached step over all N rows.

    The decode graph is built once per ``start`` and reused: the cache view always spans the whole capacity and a
    mask hides the slots not yet written, so only the inputs (tokens, position, slot, mask) change per step.
    """

    def __init__(self, backend: pg.Backend, transformer: GPT2Model, text_pos_embedding: LearnedPositionEmbeddings,
                 embeddings: Embedding, norm: LayerNorm, linear: Linear, kv_cache_type: str = "f32"):
        self.backend = backend
        self.transformer = transformer
        self.text_pos_embedding = text_pos_embedding
        self.embeddings = embeddings
        self.final_norm = norm
        self.lm_head = linear
        self.kv_cache_type = kv_cache_type
        # decode steps attend with tortoise-ggml's CPU kernel where it can run (False: ggml's flash attention)
        self.fused_attention = True
        self.cached_mel_emb: np.ndarray | None = None
        self.cache: KVCache | None = None
        self._step = None
        self._prefill_latent: np.ndarray | None = None  # the start position's latent until the first decode
        self.session = 0  # counts start() calls: a paused stream checks that the cache is still its own

    def store_mel_emb(self, mel_emb: np.ndarray) -> None:
        """The prefix embedding [cond | text], (1, P-1, model_dim)."""
        mel_emb = floats(mel_emb, "mel_emb")
        d = self.transformer.n_embd
        if mel_emb.ndim != 3 or mel_emb.shape[0] != 1 or mel_emb.shape[2] != d:
            raise ValueError(f"mel_emb must have shape (1, P, {d}), got {mel_emb.shape}")
        self.cached_mel_emb = mel_emb

    def _latent(self, ctx: Context, hidden: Tensor) -> Tensor:
        """final_norm(ln_f(hidden)): what tortoise's stream generator yields per step (final_norm of the last hidden
        state) and what lm_head's first module computes."""
        return self.final_norm.forward(ctx, self.transformer.ln_f.forward(ctx, hidden))

    def _lm_head(self, ctx: Context, hidden: Tensor) -> Tensor:
        """ln_f (GPT2Model's last op), then lm_head = Sequential(final_norm, mel_head)."""
        return self.lm_head.forward(ctx, self._latent(ctx, hidden))

    def last_latents(self) -> np.ndarray:
        """(num_rows, model_dim): the latent (final_norm of the last hidden state) of the position whose logits the
        last start() or decode() returned, i.e. of the token the next code is sampled after."""
        if self._step is None:
            raise RuntimeError("start must be called before last_latents")
        if self._prefill_latent is not None:
            return np.repeat(self._prefill_latent, self._step.n_rows, axis=0)
        return self._step.latent.get().reshape(self._step.n_rows, -1)

    def start(self, start_token: int, num_rows: int, max_new_tokens: int, mel_positions: str = "fixed"
              ) -> np.ndarray:
        """Prefill the stored prefix plus ``start_token`` and get ready to decode ``max_new_tokens`` steps over
        ``num_rows`` rows. Returns the logits for the first generated token, (num_rows, vocab)."""
        if self.cached_mel_emb is None:
            raise RuntimeError("store_mel_emb must be called before start")
        if mel_positions not in MEL_POSITIONS:
            raise ValueError(f"mel_positions must be one of {MEL_POSITIONS}, got {mel_positions!r}")
        if num_rows < 1 or max_new_tokens < 1:
            raise ValueError(f"need num_rows >= 1 and max_new_tokens >= 1, got {num_rows}, {max_new_tokens}")
        first_pos = 1 if mel_positions == "fixed" else 2
        last_pos = first_pos + max_new_tokens - 1
        if last_pos >= self.text_pos_embedding.emb.num_embeddings:
            raise ValueError(f"{max_new_tokens} new tokens need mel position {last_pos}, beyond the "
                             f"{self.text_pos_embedding.emb.num_embeddings} learned positions")
        gpt = self.transformer
        prefix = self.cached_mel_emb.shape[1] + 1
        capacity = prefix + max_new_tokens
        if self.cache is None or not self.cache.fits(gpt.n_layer, gpt.n_embd, gpt.n_head, capacity, num_rows,
                                                     self.kv_cache_type):
            self.release()         # free the old one first: caches are large
            self.cache = KVCache(self.backend, gpt.n_layer, gpt.n_embd, gpt.n_head, capacity, num_rows,
                                 self.kv_cache_type)
        logits = self._prefill(start_token, prefix)
        if self._step is None:
            self._step = _DecodeStep(self)
        self._step.reset(prefix, first_pos, capacity)
        self.session += 1
        return np.repeat(logits.reshape(1, -1), num_rows, axis=0)

    def _prefill(self, start_token: int, prefix: int) -> np.ndarray:
        inputs = pg.Inputs(ctx := Context())
        mel_emb = inputs.add(self.cached_mel_emb, "f32")                             # ne (d, P-1, 1)
        start = inputs.add(ids([[start_token]], "start_token", self.embeddings.num_embeddings), "i32")
        start_emb = ctx.add(self.embeddings.forward(ctx, start),
                            self.text_pos_embedding.get_fixed_embedding(ctx, inputs, 0))
        emb = ctx.concat(mel_emb, start_emb, 1)
        slots = inputs.add(np.arange(prefix, dtype=np.int32), "i32")
        mask = inputs.add(causal_mask(prefix), "f16")
        writes = []
        hidden = self.transformer.blocks(ctx, emb, mask, self.cache, slots, attend_cache=False, writes=writes)
        last = ctx.view(hidden, (hidden.ne[0], 1, 1), offset=(prefix - 1) * hidden.nb[1])
        latent = self._latent(ctx, last).set_output()
        logits = self.lm_head.forward(ctx, latent)
        self.backend.compute(Graph(ctx, logits, latent, *writes), inputs.feed)
        self._prefill_latent = latent.get().reshape(1, -1)
        return logits.get().reshape(-1)

    def release(self) -> None:
        """Free the KV cache and the decode graph (the next start() makes new ones)."""
        self._step = None
        self.cache = None
        self._prefill_latent = None
        self.session += 1

    def decode(self, next_tokens) -> np.ndarray:
        """Feed one token per row (N,) -> logits for the next position (N, vocab)."""
        if self._step is None:
            raise RuntimeError("start must be called before decode")
        logits = self._step(next_tokens)
        self._prefill_latent = None
        return logits


class _DecodeStep:
    """The reusable one-token graph over all cache rows."""

    def __init__(self, model: GPT2InferenceModel):
        cache, gpt = model.cache, model.transformer
        self.model, self.cache, self.n_rows = model, cache, cache.n_rows   # the graph reads this cache's memory
        ctx = self.ctx = Context()
        self.tokens = ctx.new_tensor("i32", (cache.n_rows, 1)).set_input()
        self.position = ctx.new_tensor("i32", (1, 1)).set_input()
        self.slot = ctx.new_tensor("i32", (1,)).set_input()
        self.mask = ctx.new_tensor("f16", (cache.capacity, 1)).set_input()
        # the prefix is prefilled once and broadcast to every row (KVCache.store): the fused kernel reads it once
        self.shared = ctx.new_tensor("i32", (1,)).set_input()
        tok = model.embeddings.forward(ctx, self.tokens)                           # ne (d, N, 1)
        emb = ctx.add(ctx.reshape(tok, tok.ne[0], 1, cache.n_rows),
                      model.text_pos_embedding.emb.forward(ctx, self.position))
        self.fused = model.fused_attention and gpt.fused_attention_usable(model.backend, cache)
        hidden = gpt.blocks(ctx, emb, self.mask, cache, self.slot, attend_cache=True, fused=self.fused,
                            shared=self.shared if self.fused else None)
        self.latent = model._latent(ctx, hidden).set_output()                     # ne (d, 1, N)
        self.logits = model.lm_head.forward(ctx, self.latent)                      # ne (vocab, 1, N)
        self.graph = Graph(ctx, self.logits, self.latent)
        self.allocator = pg.GraphAllocator(model.backend)
        self.mask_host = np.full((1, cache.capacity), -np.inf, dtype=np.float16)
        self.vocab = model.embeddings.num_embeddings
        self.checked = False

    def reset(self, prefix: int, first_position: int, end: int) -> None:
        self.mask_host[:] = -np.inf
        self.mask_host[0, :prefix] = 0
        self.next_slot, self.next_position, self.end = prefix, first_position, end
        self.prefix = prefix

    def __call__(self, next_tokens) -> np.ndarray:
        tokens = ids(next_tokens, "next_tokens", self.vocab, ndim=1)
        if tokens.shape[0] != self.n_rows:
            raise ValueError(f"decode takes one token per row: {self.n_rows} rows, got {tokens.shape[0]} tokens")
        if self.next_slot >= self.end:
            raise RuntimeError("decode called more often than the max_new_tokens given to start()")
        self.mask_host[0, self.next_slot] = 0
        feed = {self.tokens: tokens.reshape(1, -1), self.position: np.array([[self.next_position]], np.int32),
                self.slot: np.array([self.next_slot], np.int32), self.mask: self.mask_host}
        if self.fused:
            feed[self.shared] = np.array([self.prefix], np.int32)
        # the first step checks the graph against the backend; later steps run the same graph
        self.model.backend.compute(self.graph, feed, allocator=self.allocator, check=not self.checked)
        self.checked = True
        self.next_slot += 1
        self.next_position += 1
        return self.logits.get().reshape(self.n_rows, -1)


class UnifiedVoice(Model):
    """UnifiedVoice from a GGUF's ``autoregressive`` component: ``UnifiedVoice(model_file, backend)``."""

    component = "autoregressive"

    def __init__(self, model_file, backend: pg.Backend | None = None, component: str | None = None,
                 kv_cache_type: str = "f32", fused: bool | None = None):
        """``fused``: the GPT's Q8_0 products in tortoise-ggml's CPU kernel (kernels.q8_matmul); None (default)
        wherever it can run, False never, True insists."""
        super().__init__(model_file, backend, component)
        cfg, w = self.config, self.weights
        self.fused = kernels.choose_for(fused, self.backend)
        self.number_text_tokens = cfg.number_text_tokens
        self.start_text_token, self.stop_text_token = cfg.start_text_token, cfg.stop_text_token
        self.number_mel_codes = cfg.number_mel_codes
        self.start_mel_token, self.stop_mel_token = cfg.start_mel_token, cfg.stop_mel_token
        self.layers, self.heads, self.model_dim = cfg.layers, cfg.heads, cfg.model_dim
        self.max_mel_tokens, self.max_text_tokens = cfg.max_mel_tokens, cfg.max_text_tokens
        self.mel_length_compression = cfg.mel_length_compression
        self.layer_norm_epsilon = eps = cfg.layer_norm_epsilon
        d = self.model_dim
        self.conditioning_encoder = ConditioningEncoder(w.sub("conditioning_encoder"), cfg.conditioning_spec_dim, d,
                                                        cfg.conditioning_num_attn_blocks,
                                                        cfg.conditioning_num_attn_heads)
        self.text_embedding = Embedding(w.sub("text_embedding"), cfg.text_vocab, d)
        self.mel_embedding = Embedding(w.sub("mel_embedding"), cfg.number_mel_codes, d)
        self.gpt = GPT2Model(w.sub("gpt"), self.layers, d, self.heads, eps, self.fused)
        self.mel_pos_embedding = LearnedPositionEmbeddings(
            w.sub("mel_pos_embedding"), cfg.max_mel_tokens + 2 + cfg.max_conditioning_inputs, d)
        self.text_pos_embedding = LearnedPositionEmbeddings(w.sub("text_pos_embedding"), cfg.max_text_tokens + 2, d)
        self.final_norm = LayerNorm(w.sub("final_norm"), d, eps)
        self.text_head = Linear(w.sub("text_head"), d, cfg.text_vocab)
        self.mel_head = Linear(w.sub("mel_head"), d, cfg.number_mel_codes)
        self.post_init_gpt2_config(kv_cache_type)

    def post_init_gpt2_config(self, kv_cache_type: str = "f32") -> None:
        self.inference_model = GPT2InferenceModel(self.backend, self.gpt, self.mel_pos_embedding,
                                                  self.mel_embedding, self.final_norm, self.mel_head, kv_cache_type)

    # -- input formatting (numpy, as the reference's torch ops) ---------------------------------------------------
    @staticmethod
    def build_aligned_inputs_and_targets(input: np.ndarray, start_token: int, stop_token: int):
        inp = np.pad(input, ((0, 0), (1, 0)), constant_values=start_token)
        tar = np.pad(input, ((0, 0), (0, 1)), constant_values=stop_token)
        return inp, tar

    def set_mel_padding(self, mel_input_tokens: np.ndarray, wav_lengths: np.ndarray) -> np.ndarray:
        """Codes past each clip's length (+1) become stop_mel_token."""
        mel_input_tokens = mel_input_tokens.copy()
        mel_lengths = wav_lengths // self.mel_length_compression
        for b in range(len(mel_lengths)):
            actual_end = mel_lengths[b] + 1  # the codes come from a convolution: predict one past the last
            if actual_end < mel_input_tokens.shape[-1]:
                mel_input_tokens[b, actual_end:] = self.stop_mel_token
        return mel_input_tokens

    def _text_ids(self, text_inputs, name="text_inputs") -> np.ndarray:
        text = ids(text_inputs, name, self.text_embedding.num_embeddings)
        if text.ndim == 1:
            text = text[None]
        if text.ndim != 2:
            raise ValueError(f"{name} must have shape (B, T) or (T,), got {text.shape}")
        return text

    def _cond_latent(self, latent, batch: int) -> np.ndarray:
        lat = floats(latent, "speech_conditioning_latent")
        if lat.ndim == 1:
            lat = lat[None]
        if lat.ndim != 2 or lat.shape[1] != self.model_dim:
            raise ValueError(f"speech_conditioning_latent must have shape (B, {self.model_dim}), got {lat.shape}")
        if lat.shape[0] != batch:
            raise ValueError(f"speech_conditioning_latent has batch {lat.shape[0]}, the text {batch}")
        return lat

    def _embed(self, ctx: Context, inputs: pg.Inputs, embedding: Embedding, pos: LearnedPositionEmbeddings,
               tokens: np.ndarray) -> Tensor:
        """embedding(tokens) + pos_embedding(positions): tokens (B, T) -> ne (d, T, B)."""
        tok = embedding.forward(ctx, inputs.add(tokens, "i32"))
        return ctx.add(tok, pos.forward(ctx, inputs, tokens.shape[1]))

    # -- conditioning ---------------------------------------------------------------------------------------------
    def get_conditioning(self, speech_conditioning_input) -> np.ndarray:
        """Conditioning mels (B, n_clips, spec_dim, T) or (B, spec_dim, T) -> latent (B, model_dim): the encoder's
        frame 0 of each clip, averaged over clips."""
        x = floats(speech_conditioning_input, "speech_conditioning_input", finite=False, allow_empty=True)
        if x.ndim == 3:
            x = x[:, None]
        enc = self.conditioning_encoder
        if x.ndim != 4 or x.shape[2] != enc.spec_dim or x.shape[3] < 1:
            raise ValueError(f"conditioning mels must have shape (B, n_clips, {enc.spec_dim}, T) or "
                             f"(B, {enc.spec_dim}, T), got {np.shape(speech_conditioning_input)}")
        b, n = x.shape[:2]
        inputs = pg.Inputs(ctx := Context())
        mels = inputs.add(x.reshape(b * n, x.shape[2], x.shape[3]), "f32")          # clips as batch rows
        out, = self.compute(enc.forward(ctx, mels), inputs=inputs)
        conds = out.get().reshape(b, n, enc.dim)
        return conds.mean(axis=1, dtype=np.float32)

    # -- teacher-forced pass --------------------------------------------------------------------------------------
    def get_logits(self, ctx: Context, inputs: pg.Inputs, speech_conditioning_inputs: Tensor, first_inputs: Tensor,
                   first_head: Linear, second_inputs: Tensor, second_head: Linear, return_latent: bool = False):
        """Graph of the reference's get_logits (second_inputs given): embeddings ne (d, T, B) in; logits
        ne (vocab, T_i, B) or latents ne (d, T_i, B) out, for the first and second segments."""
        emb = ctx.concat(ctx.concat(speech_conditioning_inputs, first_inputs, 1), second_inputs, 1)
        n_cond, n_first, n_second = speech_conditioning_inputs.ne[1], first_inputs.ne[1], second_inputs.ne[1]
        mask = inputs.add(causal_mask(emb.ne[1]), "f16")
        enc = self.final_norm.forward(ctx, self.gpt.forward(ctx, emb, mask))
        d, nb1, nb2 = enc.ne[0], enc.nb[1], enc.nb[2]
        # enc[:, 1:] drops the position that only sees the conditioning latent
        first = ctx.view(enc, (d, n_first, enc.ne[2]), (nb1, nb2), n_cond * nb1)
        second = ctx.view(enc, (d, n_second, enc.ne[2]), (nb1, nb2), (enc.ne[1] - n_second) * nb1)
        if return_latent:
            return first, second
        return first_head.forward(ctx, first), second_head.forward(ctx, second)

    def build(self, ctx: Context, inputs: pg.Inputs, speech_conditioning_inputs: Tensor, text_emb: Tensor,
              mel_emb: Tensor, return_latent: bool = False):
        """The model's graph (the contract's builder): the reference's teacher-forced pass, get_logits over
        [cond | text | mel] with the text and mel heads (or the latents). Generation runs on the KV cache
        instead (inference_model)."""
        return self.get_logits(ctx, inputs, speech_conditioning_inputs, text_emb, self.text_head, mel_emb,
                               self.mel_head, return_latent=return_latent)

    def forward(self, speech_conditioning_latent, text_inputs, text_lengths, mel_codes, wav_lengths,
                return_latent: bool = False, clip_inputs: bool = True):
        """As the reference's forward with text_first=True: (loss_text, loss_mel, mel_logits (B, vocab, M+2)),
        or with return_latent the latents (B, M, model_dim). ``text_logits`` (B, 256, T+2) of the last call are
        kept in ``self.text_logits``."""
        text_inputs = self._text_ids(text_inputs)
        mel_codes = ids(mel_codes, "mel_codes", self.mel_embedding.num_embeddings, ndim=2)
        text_lengths = np.asarray(text_lengths).reshape(-1)
        wav_lengths = np.asarray(wav_lengths).reshape(-1)
        b = text_inputs.shape[0]
        if mel_codes.shape[0] != b:
            raise ValueError(f"batch sizes differ: text {b}, mel_codes {mel_codes.shape[0]}")
        # like the reference, a single length for a batch (api.py passes one) pads only row 0 in set_mel_padding
        if not (1 <= len(text_lengths) <= b and 1 <= len(wav_lengths) <= b):
            raise ValueError(f"text_lengths ({len(text_lengths)}) and wav_lengths ({len(wav_lengths)}) need 1 to "
                             f"{b} entries (one per row)")
        conds_np = self._cond_latent(speech_conditioning_latent, b)
        if clip_inputs:
            # batches are padded: cut them to the longest actual input
            text_inputs = text_inputs[:, :text_lengths.max()]
            mel_codes = mel_codes[:, :wav_lengths.max() // self.mel_length_compression]
        mel_codes = self.set_mel_padding(mel_codes, wav_lengths)
        text_inputs = np.pad(text_inputs, ((0, 0), (0, 1)), constant_values=self.stop_text_token)
        mel_codes = np.pad(mel_codes, ((0, 0), (0, 1)), constant_values=self.stop_mel_token)
        text_inputs, text_targets = self.build_aligned_inputs_and_targets(text_inputs, self.start_text_token,
                                                                          self.stop_text_token)
        mel_codes, mel_targets = self.build_aligned_inputs_and_targets(mel_codes, self.start_mel_token,
                                                                       self.stop_mel_token)
        for name, tokens, table in (("text", text_inputs, self.text_pos_embedding),
                                    ("mel", mel_codes, self.mel_pos_embedding)):
            if tokens.shape[1] > table.emb.num_embeddings:
                raise ValueError(f"{tokens.shape[1]} {name} tokens (with start/stop) exceed the "
                                 f"{table.emb.num_embeddings} learned {name} positions")
        inputs = pg.Inputs(ctx := Context())
        conds = inputs.add(conds_np[:, None, :], "f32")                               # ne (d, 1, B)
        text_emb = self._embed(ctx, inputs, self.text_embedding, self.text_pos_embedding, text_inputs)
        mel_emb = self._embed(ctx, inputs, self.mel_embedding, self.mel_pos_embedding, mel_codes)
        text_out, mel_out = self.build(ctx, inputs, conds, text_emb, mel_emb, return_latent=return_latent)
        if return_latent:
            latents = ctx.cont(ctx.view(mel_out, (mel_out.ne[0], mel_out.ne[1] - 2, b), mel_out.nb[1:3]))
            self.compute(latents, inputs=inputs)
            return _get(latents)[0]  # the two positions this pass added (start/stop) stripped
        self.compute(text_out, mel_out, inputs=inputs)
        text_logits = _get(text_out)[0].transpose(0, 2, 1)
        mel_logits = _get(mel_out)[0].transpose(0, 2, 1)
        self.text_logits = text_logits
        loss_text = _cross_entropy(text_logits, text_targets)
        loss_mel = _cross_entropy(mel_logits, mel_targets)
        return loss_text, loss_mel, mel_logits

    # -- generation -----------------------------------------------------------------------------------------------
    def compute_prefix(self, speech_conditioning_latent, text_inputs) -> np.ndarray:
        """Store [cond | start_text, text, stop_text] embeddings in the inference model; returns the fake
        input_ids (1, P) that HF generate starts from (1s, then start_mel_token), as inference_speech builds."""
        text_inputs = self._text_ids(text_inputs)
        if text_inputs.shape[0] != 1:
            raise ValueError(f"inference takes one text (batch 1), got {text_inputs.shape[0]}")
        text_inputs = np.pad(text_inputs, ((0, 0), (0, 1)), constant_values=self.stop_text_token)
        text_inputs, _ = self.build_aligned_inputs_and_targets(text_inputs, self.start_text_token,
                                                               self.stop_text_token)
        if text_inputs.shape[1] > self.text_pos_embedding.emb.num_embeddings:
            raise ValueError(f"{text_inputs.shape[1]} text tokens (with start/stop) exceed the "
                             f"{self.text_pos_embedding.emb.num_embeddings} learned text positions")
        conds = self._cond_latent(speech_conditioning_latent, 1)
        inputs = pg.Inputs(ctx := Context())
        text_emb = self._embed(ctx, inputs, self.text_embedding, self.text_pos_embedding, text_inputs)
        self.compute(text_emb, inputs=inputs)
        emb = np.concatenate([conds[:, None, :], _get(text_emb)[0]], axis=1)
        self.inference_model.store_mel_emb(emb)
        fake_inputs = np.full((1, emb.shape[1] + 1), 1, dtype=np.int64)
        fake_inputs[:, -1] = self.start_mel_token
        return fake_inputs

    def inference_speech(self, speech_conditioning_latent, text_inputs, num_return_sequences: int = 1,
                         max_generate_length: int | None = None, typical_sampling: bool = False,
                         typical_mass: float = .9, do_sample: bool = True, top_p: float = 1.0,
                         temperature: float = 1.0, repetition_penalty: float = 1.0, top_k: int = 50,
                         rng: np.random.Generator | int | None = None, mel_positions: str = "fixed",
                         progress=None) -> np.ndarray:
        """Sample ``num_return_sequences`` code sequences for one text: (N, <= max_generate_length) int64, rows
        that stopped early padded with stop_mel_token (the reference's ``gen[:, trunc_index:]``).

        input_ids are what HF generate sees (the repetition penalty counts them): 1s for the prefix, then
        start_mel_token. ``mel_positions``: "fixed" or "original" (see the module docstring). ``rng``: a numpy
        Generator or seed; ``progress(generated, limit)`` is called after every step.
        """
        from ..utils import sampling

        fake_inputs = self.compute_prefix(speech_conditioning_latent, text_inputs)
        trunc_index = fake_inputs.shape[1]
        max_new = self.max_mel_tokens - 1 if max_generate_length is None else int(max_generate_length)
        first_logits = self.inference_model.start(self.start_mel_token, num_return_sequences, max_new,
                                                  mel_positions)
        inputs = np.repeat(fake_inputs, num_return_sequences, axis=0)
        gen = sampling.generate(self.inference_model.decode, first_logits, inputs, max_new_tokens=max_new,
                                eos_token_id=self.stop_mel_token, pad_token_id=self.stop_mel_token,
                                do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty,
                                typical_mass=typical_mass if typical_sampling else None, rng=rng, progress=progress)
        return gen[:, trunc_index:]

    def inference_speech_stream(self, speech_conditioning_latent, text_inputs, max_generate_length: int | None = None,
                                typical_sampling: bool = False, typical_mass: float = .9, do_sample: bool = True,
                                top_p: float = 1.0, temperature: float = 1.0, repetition_penalty: float = 1.0,
                                top_k: int = 50, rng: np.random.Generator | int | None = None,
                                mel_positions: str = "fixed"):
        """One sequence as ``inference_speech`` samples it, step by step: a generator of (code, latent) per generated
        token, as tortoise's stream generator (get_generator, api_fast.py's tts_stream) yields them. ``latent``
        (model_dim,) float32 is final_norm of the last hidden state at the position the code was sampled after (the
        start token's for the first code): the i-th latent is the i-th of ``forward(..., return_latent=True)`` on
        the codes. The last pair is (stop_mel_token, latent) unless ``max_generate_length`` codes come first. With
        the same ``rng`` the codes are those of ``inference_speech(num_return_sequences=1)``.

        The KV cache lives while the generator does: closing it (or dropping it) releases the cache. Another
        generation on this model while the stream is paused takes the cache over: the stream then raises."""
        from ..utils import sampling

        fake_inputs = self.compute_prefix(speech_conditioning_latent, text_inputs)
        max_new = self.max_mel_tokens - 1 if max_generate_length is None else int(max_generate_length)
        im = self.inference_model
        scores = im.start(self.start_mel_token, 1, max_new, mel_positions)
        session = im.session
        rng = as_generator(rng) if do_sample else None
        settings = dict(eos_token_id=self.stop_mel_token, pad_token_id=self.stop_mel_token, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                        typical_mass=typical_mass if typical_sampling else None, rng=rng)
        input_ids = fake_inputs
        try:
            for step in range(max_new):
                latent = im.last_latents()[0]
                # one step of the same sampling loop (one Generator: the draws of a whole inference_speech run)
                input_ids = sampling.generate(None, scores, input_ids, max_new_tokens=1, **settings)
                code = int(input_ids[0, -1])
                yield code, latent
                if code == self.stop_mel_token or step == max_new - 1:
                    return
                if im.session != session:
                    raise RuntimeError("another generation started on this model while the stream was paused: its "
                                       "KV cache is gone")
                scores = im.decode(np.array([code]))
        finally:
            if im.session == session:
                im.release()
