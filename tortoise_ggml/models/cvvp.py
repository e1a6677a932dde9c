"""CVVP (tortoise/models/cvvp.py, tortoise-tts 3.0.0) on ggml: the contrastive voice-voice model, which scores how
well each candidate's speech codes match the voice of the conditioning clips. tortoise/api.py mixes its scores with
CLVP's when ``cvvp_amount`` > 0 (``clvp * (1 - amount) + cvvp * amount``).

    cvvp = CVVP(model_file, backend)
    sims = cvvp.forward(mel_cond, codes)        # (N, 80, T) conditioning mels and (N, S) codes -> (N,) float32
    scores = cvvp.score(cond_mels, codes)       # (n_clips, 80, T) and (N, S) -> (N,): the mean over the clips

The reference as api.py's load_cvvp builds it (mel_codes given): the conditioning mels go through two strided
Conv1d (``cond_emb``), the codes through an embedding (``speech_emb``); each through a CollapsingTransformer (an
x-transformers encoder, tortoise_ggml.models.xtransformers, then Conv1d 1x1, AttentionBlock, Conv1d 1x1 and the
mean over positions), a bias-free Linear, L2 normalisation, and the dot product times exp(temperature).

Masks: in eval mode the reference's CollapsingTransformer averages with an all-true mask and the encoders get no
mask, so every position (the codes' padding included) takes part, exactly as here.

Batching: the conditioning latent of each distinct clip is computed once (api.py repeats one clip's mels for every
candidate of a batch), and the candidates' codes run ``max_batch`` (default 16) to a graph.
"""
from __future__ import annotations

import numpy as np

import pyggml as pg
from pyggml import Context, Tensor

from ..utils.checks import floats, positive_int
from . import layers
from .arch_util import AttentionBlock, Conv1d, Embedding, Linear, ModuleWeights
from .base import Model
from .clvp import NORMALIZE_EPS, masked_mean
from .xtransformers import encoder_from_config


class CollapsingTransformer:
    """The reference's CollapsingTransformer (eval mode): encoder, pre_combiner (Conv1d 1x1, AttentionBlock,
    Conv1d 1x1) and the mean over positions."""

    def __init__(self, w: ModuleWeights, model_dim: int, output_dims: int, heads: int, depth: int, config):
        self.transformer = encoder_from_config(w.sub("transformer"), model_dim, depth, heads, config)
        self.pre_combiner = (Conv1d(w.sub("pre_combiner.0"), model_dim, output_dims, 1),
                             AttentionBlock(w.sub("pre_combiner.1"), output_dims, num_heads=heads),
                             Conv1d(w.sub("pre_combiner.2"), output_dims, output_dims, 1))

    def forward(self, ctx: Context, x: Tensor, positions: Tensor) -> Tensor:
        """x: sequence data ne (dim, T, B); positions I32 0..T-1 -> ne (output_dims, B)."""
        h = self.transformer.forward(ctx, x, positions)                 # ne (dim, T, B)
        conv_in, attn, conv_out = self.pre_combiner
        h = layers.to_sequence(ctx, conv_in.forward_sequence(ctx, h))   # channel data ne (T, C, B)
        h = layers.to_sequence(ctx, attn.forward(ctx, h))               # sequence data ne (C, T, B)
        return masked_mean(ctx, conv_out.forward_sequence(ctx, h))


class CVVP(Model):
    """``CVVP(model_file, backend=None, max_batch=16)``; ``forward(mel_cond, mel_input)`` -> similarities (N,),
    ``score(cond_mels, codes)`` -> api.py's CVVP score per candidate (N,)."""

    component = "cvvp"

    def __init__(self, model_file, backend: pg.Backend | None = None, component: str | None = None,
                 max_batch: int = 16):
        self.max_batch = positive_int(max_batch, "max_batch")  # candidates per graph
        super().__init__(model_file, backend, component)
        cfg, w = self.config, self.weights
        if cfg.latent_multiplier != 1:
            # the reference's conditioning side feeds model_dim features to a latent_dim Linear: it only runs at 1
            raise ValueError(f"{model_file.path}: CVVP latent_multiplier {cfg.latent_multiplier} is not supported "
                             "(tortoise's CVVP only runs with 1)")
        d = cfg.model_dim
        self.model_dim, self.mel_channels, self.mel_codes = d, cfg.mel_channels, cfg.mel_codes
        self.latent_dim = cfg.latent_multiplier * d
        self.cond_emb = (Conv1d(w.sub("cond_emb.0"), cfg.mel_channels, d // 2, 5, stride=2, padding=2),
                         Conv1d(w.sub("cond_emb.1"), d // 2, d, 3, stride=2, padding=1))
        self.conditioning_transformer = CollapsingTransformer(
            w.sub("conditioning_transformer"), d, d, cfg.transformer_heads, cfg.conditioning_enc_depth, cfg)
        self.to_conditioning_latent = Linear(w.sub("to_conditioning_latent"), self.latent_dim, self.latent_dim,
                                             bias=False)
        self.speech_emb = Embedding(w.sub("speech_emb.emb"), cfg.mel_codes, d)      # ConvFormatEmbedding
        self.speech_transformer = CollapsingTransformer(
            w.sub("speech_transformer"), d, self.latent_dim, cfg.transformer_heads, cfg.speech_enc_depth, cfg)
        self.to_speech_latent = Linear(w.sub("to_speech_latent"), self.latent_dim, self.latent_dim, bias=False)
        self.temperature = w("temperature", (1,))

    # -- the graph ------------------------------------------------------------------------------------------------
    def conditioning_latents(self, ctx: Context, mel_cond: Tensor, positions: Tensor) -> Tensor:
        """Conditioning mels, channel data ne (T, mel_channels, M) -> L2-normalised latents ne (L, M).
        ``positions``: I32 0..T'-1 for the T' = ceil(ceil(T/2)/2) frames after the two strided convolutions."""
        h = mel_cond
        for conv in self.cond_emb:
            h = conv.forward(ctx, h)                                            # ne (T', d, M)
        enc = self.conditioning_transformer.forward(ctx, layers.to_sequence(ctx, h), positions)
        return ctx.l2_norm(self.to_conditioning_latent.forward(ctx, enc), NORMALIZE_EPS)

    def speech_latents(self, ctx: Context, speech_tokens: Tensor, positions: Tensor) -> Tensor:
        """Codes I32 ne (S, N) -> L2-normalised latents ne (L, N); ``positions``: I32 0..S-1."""
        s, n = speech_tokens.ne[0], speech_tokens.ne[1]
        emb = ctx.reshape(self.speech_emb.forward(ctx, speech_tokens), self.model_dim, s, n)
        enc = self.speech_transformer.forward(ctx, emb, positions)
        return ctx.l2_norm(self.to_speech_latent.forward(ctx, enc), NORMALIZE_EPS)

    def build(self, ctx: Context, mel_cond: Tensor, speech_tokens: Tensor, cond_positions: Tensor,
              speech_positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The reference's CVVP.forward as a graph, every conditioning row against every candidate.

        mel_cond: F32 ne (T, mel_channels, M); speech_tokens: I32 ne (S, N); *_positions as in
        conditioning_latents / speech_latents. Returns (cond_latents ne (L, M), speech_latents ne (L, N),
        sim ne (M, N)): sim[n][m] = <cond m, speech n> * exp(temperature) (the reference's einsum for row pairs)."""
        cond = self.conditioning_latents(ctx, mel_cond, cond_positions)
        speech = self.speech_latents(ctx, speech_tokens, speech_positions)
        sim = ctx.mul(ctx.mul_mat(cond, speech), ctx.exp(self.temperature))
        return cond, speech, sim

    # -- numpy ----------------------------------------------------------------------------------------------------
    def _mels(self, a, name: str) -> np.ndarray:
        mels = floats(a, name, ndim=(2, 3, 4))
        if mels.ndim == 4:                       # api.py's auto_conds (1, n_clips, C, T)
            if mels.shape[0] != 1:
                raise ValueError(f"{name} of shape {mels.shape}: give (n_clips, {self.mel_channels}, T)")
            mels = mels[0]
        if mels.ndim == 2:
            mels = mels[None]
        if mels.shape[1] != self.mel_channels or mels.shape[2] < 1:
            raise ValueError(f"{name} must have shape (N, {self.mel_channels}, T), got {np.shape(a)}")
        return mels

    def _codes(self, a) -> np.ndarray:
        arr = np.asarray(a)
        if arr.dtype == bool or arr.dtype.kind not in "iu":
            raise TypeError(f"mel_input must hold integer speech codes, got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"mel_input must be 2-D (candidates, codes), got shape {arr.shape}")
        if arr.min() < 0 or arr.max() >= self.mel_codes:
            bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
            raise ValueError(f"mel_input holds code {bad}, outside this model's codes 0..{self.mel_codes - 1}")
        return np.ascontiguousarray(arr, dtype=np.int32)

    def similarities(self, cond_mels, codes) -> np.ndarray:
        """Every clip against every candidate: (M, C, T) mels and (N, S) codes -> float32 (N, M)."""
        mels, codes = self._mels(cond_mels, "cond_mels"), self._codes(codes)
        m, t = mels.shape[0], mels.shape[2]
        t_out = (((t + 1) // 2) + 1) // 2          # the two stride-2 convolutions (k5 p2, k3 p1)
        out = []
        for start in range(0, codes.shape[0], self.max_batch):
            chunk = codes[start:start + self.max_batch]
            n, s = chunk.shape
            with pg.Context() as ctx:
                inputs = pg.Inputs(ctx)
                mel_in, codes_in = inputs.add(mels), inputs.add(chunk)
                cond_pos = inputs.add(np.arange(t_out, dtype=np.int32))
                speech_pos = inputs.add(np.arange(s, dtype=np.int32))
                *_, sim = self.compute(*self.build(ctx, mel_in, codes_in, cond_pos, speech_pos), inputs=inputs)
                out.append(sim.get().reshape(n, m))
        return np.concatenate(out)

    def forward(self, mel_cond, mel_input) -> np.ndarray:
        """The reference's ``forward(mel_cond, mel_input, return_loss=False)``: row n of the conditioning mels
        (N, mel_channels, T) against row n of the codes (N, S) -> float32 (N,). One mels row is used for every
        candidate; repeated rows are encoded once."""
        mels, codes = self._mels(mel_cond, "mel_cond"), self._codes(mel_input)
        n = codes.shape[0]
        if mels.shape[0] not in (1, n):
            raise ValueError(f"mel_cond has {mels.shape[0]} rows for {n} candidates: give one row, or one per "
                             "candidate")
        unique, inverse = np.unique(mels, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1) if mels.shape[0] == n else np.zeros(n, np.int64)
        sims = self.similarities(unique, codes)
        return sims[np.arange(n), inverse].astype(np.float32)

    def score(self, cond_mels, codes) -> np.ndarray:
        """api.py's CVVP score of each candidate: the similarity to each conditioning clip's mels, averaged over
        the clips (its ``cvvp_accumulator / auto_conds.shape[1]``). cond_mels: (n_clips, mel_channels, T) (or
        api's (1, n_clips, mel_channels, T)); codes (N, S) -> float32 (N,)."""
        sims = self.similarities(cond_mels, codes)
        acc = np.zeros(sims.shape[0], np.float32)
        for cl in range(sims.shape[1]):         # accumulate in clip order, as the reference does
            acc = acc + sims[:, cl]
        return (acc / np.float32(sims.shape[1])).astype(np.float32)


__all__ = ["CVVP", "CollapsingTransformer"]
