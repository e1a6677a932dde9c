"""CLVP (tortoise/models/clvp.py, tortoise-tts 3.0.0) on ggml: scores how well each candidate's speech codes match the
text, so the pipeline keeps the best autoregressive candidates.

    clvp = CLVP(model_file, backend)
    scores = clvp.forward(text_tokens, codes)    # (1|N, T) and (N, S) int arrays -> (N,) float32

The reference as api.py builds it (use_xformers=True): two x-transformers encoders (tortoise_ggml.models.
xtransformers) over token embeddings, the mean over positions, a Linear to the latent space, L2 normalisation, and
the dot product times exp(temperature).

Masks: CLVP.forward in eval mode uses all-true text and voice masks (``torch.ones_like``), so every position,
padding included, takes part in attention and in the mean, exactly as here. Only training draws random masks.

Batching: all candidates of a chunk (``max_batch``, default 16) run in one graph. api.py repeats one text for every
candidate; here each distinct text row is encoded once and shared.
"""
from __future__ import annotations

import numpy as np

import pyggml as pg
from pyggml import Context, Tensor

from .. import kernels
from ..utils.checks import ids, positive_int
from .arch_util import Embedding, Linear, ModuleWeights
from .base import Model
from .xtransformers import encoder_from_config

NORMALIZE_EPS = 1e-12


def masked_mean(ctx: Context, t: Tensor) -> Tensor:
    """Mean over positions of ne (dim, T, B) -> ne (dim, B): the reference's masked_mean under its all-true eval
    mask (sum over positions / T)."""
    d, b = t.ne[0], t.ne[2]
    per_channel = ctx.cont(ctx.permute(t, 1, 0, 2, 3))              # ne (T, dim, B): ggml means run along ne[0]
    return ctx.reshape(ctx.mean(per_channel), d, b)


class CheckpointedXTransformerEncoder:
    """tortoise/models/arch_util.py's wrapper: ContinuousTransformerWrapper at ``.transformer``, each layer's block
    wrapped in a weightless CheckpointedLayer (the ``.wrap`` in the keys); CLVP builds it without permutes."""

    def __init__(self, w: ModuleWeights, dim: int, depth: int, heads: int, config, fused: bool = False):
        self.transformer = encoder_from_config(w.sub("transformer"), dim, depth, heads, config, wrap=".wrap",
                                               fused=fused)

    def forward(self, ctx: Context, x: Tensor, positions: Tensor) -> Tensor:
        return self.transformer.forward(ctx, x, positions)


class CLVP(Model):
    """``CLVP(model_file, backend=None, max_batch=16)``; ``forward(text, speech_tokens)`` -> scores (N,).

    ``backend`` defaults to the model file's; the weights must live where it can read them. ``fused``: the
    transformers' Q8_0 products in tortoise-ggml's CPU kernel (kernels.q8_matmul); None (default) wherever it can
    run, False never, True insists."""

    component = "clvp"

    def __init__(self, model_file, backend: pg.Backend | None = None, component: str | None = None,
                 max_batch: int = 16, fused: bool | None = None):
        self.max_batch = positive_int(max_batch, "max_batch")  # candidates per graph
        super().__init__(model_file, backend, component)
        cfg, w = self.config, self.weights
        self.fused = kernels.choose_for(fused, self.backend)
        self.num_text_tokens, self.num_speech_tokens = cfg.num_text_tokens, cfg.num_speech_tokens
        self.dim_latent = cfg.dim_latent
        self.text_emb = Embedding(w.sub("text_emb"), cfg.num_text_tokens, cfg.dim_text)
        self.to_text_latent = Linear(w.sub("to_text_latent"), cfg.dim_text, cfg.dim_latent, bias=False)
        self.speech_emb = Embedding(w.sub("speech_emb"), cfg.num_speech_tokens, cfg.dim_speech)
        self.to_speech_latent = Linear(w.sub("to_speech_latent"), cfg.dim_speech, cfg.dim_latent, bias=False)
        self.text_transformer = CheckpointedXTransformerEncoder(
            w.sub("text_transformer"), cfg.dim_text, cfg.text_enc_depth, cfg.text_heads, cfg, self.fused)
        self.speech_transformer = CheckpointedXTransformerEncoder(
            w.sub("speech_transformer"), cfg.dim_speech, cfg.speech_enc_depth, cfg.speech_heads, cfg, self.fused)
        self.temperature = w("temperature", (1,))

    # -- the graph ------------------------------------------------------------------------------------------------
    def build(self, ctx: Context, text: Tensor, speech_tokens: Tensor, text_positions: Tensor,
                      speech_positions: Tensor, text_index: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The reference's CLVP.forward(return_loss=False) as a graph.

        text: I32 ne (T, U), U distinct text rows; speech_tokens: I32 ne (S, N); *_positions: I32 0..T-1, 0..S-1;
        text_index: I32 ne (N), the text row of each candidate (None when U == 1: one text for all).
        Returns (text_latents ne (L, U), speech_latents ne (L, N), sim ne (N)); latents are L2-normalised.
        """
        t, u = text.ne[0], text.ne[1]
        s, n = speech_tokens.ne[0], speech_tokens.ne[1]
        text_emb = ctx.reshape(self.text_emb.forward(ctx, text), self.text_emb.embedding_dim, t, u)
        speech_emb = ctx.reshape(self.speech_emb.forward(ctx, speech_tokens), self.speech_emb.embedding_dim, s, n)

        enc_text = self.text_transformer.forward(ctx, text_emb, text_positions)
        enc_speech = self.speech_transformer.forward(ctx, speech_emb, speech_positions)

        text_latents = masked_mean(ctx, enc_text)
        speech_latents = masked_mean(ctx, enc_speech)

        text_latents = self.to_text_latent.forward(ctx, text_latents)          # ne (L, U)
        speech_latents = self.to_speech_latent.forward(ctx, speech_latents)    # ne (L, N)

        text_latents = ctx.l2_norm(text_latents, NORMALIZE_EPS)
        speech_latents = ctx.l2_norm(speech_latents, NORMALIZE_EPS)

        temp = ctx.exp(self.temperature)

        # einsum('n d, n d -> n'): each candidate against its own text row (one shared row broadcasts)
        paired = text_latents if text_index is None else ctx.get_rows(text_latents, text_index)
        sim = ctx.sum_rows(ctx.mul(speech_latents, paired))                    # ne (1, N)
        sim = ctx.mul(ctx.reshape(sim, n), temp)
        return text_latents, speech_latents, sim

    # -- inputs -----------------------------------------------------------------------------------------------------
    @staticmethod
    def _tokens(name: str, a, vocab: int) -> np.ndarray:
        arr = np.asarray(a)
        if arr.dtype == bool or arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D (rows, tokens), got shape {arr.shape}")
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"{name} must have at least one row and one token, got shape {arr.shape}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} holds token id {bad}, outside this model's vocabulary 0..{vocab - 1}")
        return ids(arr, name, vocab)

    def forward(self, text, speech_tokens, return_latents: bool = False):
        """Scores of N candidates: ``text`` (1 or N, T) text token ids (one row is used for every candidate, as
        api.py's ``text_tokens.repeat(N, 1)``), ``speech_tokens`` (N, S) speech codes (api.py: the AR codes after
        fix_autoregressive_output, padded to 500). Returns float32 (N,); with ``return_latents`` also the
        L2-normalised text and speech latents, each (N, dim_latent)."""
        text = self._tokens("text", text, self.num_text_tokens)
        speech = self._tokens("speech_tokens", speech_tokens, self.num_speech_tokens)
        n = speech.shape[0]
        if text.shape[0] not in (1, n):
            raise ValueError(f"text has {text.shape[0]} rows for {n} speech candidates: give one row, or one per "
                             "candidate")
        sims, text_latents, speech_latents = [], [], []
        for start in range(0, n, self.max_batch):
            chunk = speech[start:start + self.max_batch]
            rows = text if text.shape[0] == 1 else text[start:start + self.max_batch]
            sim, tl, sl = self._run(rows, chunk)
            sims.append(sim)
            text_latents.append(tl)
            speech_latents.append(sl)
        scores = np.concatenate(sims)
        if not return_latents:
            return scores
        return scores, np.concatenate(text_latents), np.concatenate(speech_latents)

    def _run(self, text: np.ndarray, speech: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        unique, inverse = np.unique(text, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1).astype(np.int32)
        (u, t), (n, s) = unique.shape, speech.shape
        with pg.Context() as ctx:
            inputs = pg.Inputs(ctx)
            text_in, speech_in = inputs.add(unique), inputs.add(speech)
            text_pos, speech_pos = inputs.add(np.arange(t, dtype=np.int32)), inputs.add(np.arange(s, dtype=np.int32))
            index = inputs.add(inverse) if u > 1 else None
            text_latents, speech_latents, sim = self.compute(
                *self.build(ctx, text_in, speech_in, text_pos, speech_pos, index), inputs=inputs)
            tl = text_latents.get().reshape(u, self.dim_latent)[inverse if u > 1 else np.zeros(n, np.int32)]
            return sim.get().reshape(n), tl, speech_latents.get().reshape(n, self.dim_latent)


__all__ = ["CLVP", "CheckpointedXTransformerEncoder", "masked_mean"]
