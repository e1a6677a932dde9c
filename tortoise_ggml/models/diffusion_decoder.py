"""Tortoise's diffusion decoder (tortoise/models/diffusion_decoder.py DiffusionTts, tortoise-tts 3.0.0) on ggml.

Same blocks, names and order as the reference: timestep_embedding, ResBlock, DiffusionLayer, DiffusionTts
(get_conditioning, timestep_independent, forward), with the pieces of tortoise/models/arch_util.py
(normalization, QKVAttentionLegacy, AttentionBlock) and xtransformers.RelativePositionBias they use.

Inference-only: dropout, layer drop, the training-time unconditioned batches and the DDP "extraneous addition"
(0 * the mean of unused parameters) have no effect at inference and are left out.

Layouts follow tortoise_ggml.layers: the conditioning paths run on channel data ne (T, C, B) (the memory of torch's
(B, C, T)); the step's trunk runs on sequence data ne (C, T, B) throughout, where its attention and 1x1 convolutions
need no transposes and, on the CPU, the fused kernels take the norms, the Q8_0 products (AVX-512 VNNI or AVX2) and the
residual adds. Numpy arrays in and out have the reference's shapes.

One sampling step calls ``forward`` on a batch that holds both the conditioned and the conditioning-free entry
(``conditioning_free`` may be a per-entry sequence), so each step is one graph; the graph is built once per
(batch, length, conditioning pattern) and recomputed with new inputs.
"""
from __future__ import annotations

import numpy as np

import pyggml as pg
from pyggml import Context, Tensor

from .. import kernels
from ..utils.checks import floats
from . import layers
from .arch_util import AttentionBlock, Conv1d, Embedding, GroupNorm32, Linear, ModuleWeights
from .base import Model

# timestep_embedding's default, which DiffusionTts.forward uses
MAX_PERIOD = 10000
# ------------------------------------------------------------------------------------------------------------------
# numpy helpers
# ------------------------------------------------------------------------------------------------------------------
def is_latent(t: np.ndarray) -> bool:
    """The reference tells AR latents (float) from AR codes (long) by dtype."""
    return t.dtype.kind == "f"


def is_sequence(t: np.ndarray) -> bool:
    return t.dtype.kind in "iu"


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


# ------------------------------------------------------------------------------------------------------------------
# torch modules
# ------------------------------------------------------------------------------------------------------------------
def timestep_embedding(ctx: Context, timesteps: Tensor, dim: int, max_period: int = MAX_PERIOD) -> Tensor:
    """[cos | sin] sinusoidal embeddings of F32 timesteps ne (N,) -> ne (dim, N); ggml's op has the reference's
    frequencies, order and odd-dim zero column."""
    return ctx.timestep_embedding(timesteps, dim, max_period)


class ResBlock:
    """diffusion_decoder.ResBlock(channels, channels, dropout, use_scale_shift_norm=True) with the default
    efficient_config (1x1 input conv) and kernel_size 3, on sequence data ne (C, T, B) and embeddings ne (C, B).
    ``fused``: the norms (with scale, shift and SiLU), products and the skip add in tortoise-ggml's CPU kernels."""

    def __init__(self, w: ModuleWeights, channels: int, emb_channels: int, fused: bool = False):
        # in_layers: GroupNorm32, SiLU, Conv1d(1x1); emb_layers: SiLU, Linear(emb, 2C);
        # out_layers: GroupNorm32, SiLU, Dropout, Conv1d(k3, p1)
        self.channels, self.fused = channels, fused
        self.in_layers = (GroupNorm32(w.sub("in_layers.0"), channels),
                          Conv1d(w.sub("in_layers.2"), channels, channels, 1))
        self.emb_layers = Linear(w.sub("emb_layers.1"), emb_channels, 2 * channels)
        self.out_layers = (GroupNorm32(w.sub("out_layers.0"), channels),
                           Conv1d(w.sub("out_layers.3"), channels, channels, 3, padding=1))

    def forward(self, ctx: Context, x: Tensor, emb: Tensor) -> Tensor:
        f = self.fused
        in_norm, in_conv = self.in_layers
        h = in_conv.forward_sequence(ctx, in_norm.forward_sequence(ctx, x, silu=True, fused=f), fused=f)
        emb_out = self.emb_layers.forward(ctx, ctx.silu(emb))                    # ne (2C, B)
        # out_norm(h) * (1 + scale) + shift, then SiLU and the conv; skip_connection is the identity
        out_norm, out_conv = self.out_layers
        h = out_norm.forward_sequence(ctx, h, emb=emb_out, silu=True, fused=f)
        return out_conv.forward_sequence(ctx, h, residual=x, fused=f)


class DiffusionLayer:
    def __init__(self, w: ModuleWeights, model_channels: int, num_heads: int, num_buckets: int, max_distance: int,
                 fused: bool = False):
        self.resblk = ResBlock(w.sub("resblk"), model_channels, model_channels, fused)
        self.attn = AttentionBlock(w.sub("attn"), model_channels, num_heads, True, num_buckets, max_distance, fused)

    def forward(self, ctx: Context, inputs: pg.Inputs, x: Tensor, time_emb: Tensor) -> Tensor:
        y = self.resblk.forward(ctx, x, time_emb)
        return self.attn.forward_sequence(ctx, y, inputs)


class DiffusionTts(Model):
    """DiffusionTts on ggml: ``DiffusionTts(model_file, backend)`` with the weights of the model file's
    ``diffusion`` component (living in ``backend``'s memory; default: the model file's backend)."""

    component = "diffusion"

    def __init__(self, model_file, backend: pg.Backend | None = None, component: str | None = None,
                 fused: bool | None = None):
        """``fused``: tortoise-ggml's CPU kernels (the attention softmax with the relative position bias, the
        trunk's fused GroupNorm and its Q8_0 / F32 / F16 products, tortoise_ggml/kernels); None (default) wherever
        they can run, False never (plain ggml ops, as a GPU runs them), True insists."""
        super().__init__(model_file, backend, component)
        cfg, w = self.config, self.weights
        self.in_channels = c_in = cfg.in_channels
        self.model_channels = c = cfg.model_channels
        self.out_channels = cfg.out_channels
        self.in_latent_channels = cfg.in_latent_channels
        self.in_tokens = cfg.in_tokens
        self.num_heads = heads = cfg.num_heads
        self.num_layers = cfg.num_layers
        self.fused = kernels.choose(
            fused, kernels.usable(self.backend), f"the fused attention kernel cannot run on the "
            f"{self.backend.kind} backend (kernels {'built' if kernels.available() else 'missing'})")
        rp = (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, self.fused)

        def attention_block(prefix, channels=c):
            return AttentionBlock(w.sub(prefix), channels, heads, True, *rp)

        self.inp_block = Conv1d(w.sub("inp_block"), c_in, c, 3, padding=1)
        self.time_embed = (Linear(w.sub("time_embed.0"), c, c), Linear(w.sub("time_embed.2"), c, c))
        self.code_embedding = Embedding(w.sub("code_embedding"), self.in_tokens, c)
        self.code_converter = [attention_block(f"code_converter.{i}") for i in range(3)]
        self.code_norm = GroupNorm32(w.sub("code_norm"), c)
        self.latent_conditioner = (Conv1d(w.sub("latent_conditioner.0"), self.in_latent_channels, c, 3, padding=1),
                                   [attention_block(f"latent_conditioner.{i}") for i in range(1, 5)])
        self.contextual_embedder = (Conv1d(w.sub("contextual_embedder.0"), c_in, c, 3, stride=2, padding=1),
                                    Conv1d(w.sub("contextual_embedder.1"), c, 2 * c, 3, stride=2, padding=1),
                                    [attention_block(f"contextual_embedder.{i}", 2 * c) for i in range(2, 7)])
        self.unconditioned_embedding = w("unconditioned_embedding", (1, c, 1))
        self.conditioning_timestep_integrator = [
            DiffusionLayer(w.sub(f"conditioning_timestep_integrator.{i}"), c, heads, *rp) for i in range(3)]
        self.integrating_conv = Conv1d(w.sub("integrating_conv"), 2 * c, c, 1)
        self.mel_head = Conv1d(w.sub("mel_head"), c, c_in, 3, padding=1)
        self.layers = ([DiffusionLayer(w.sub(f"layers.{i}"), c, heads, *rp) for i in range(self.num_layers)]
                       + [ResBlock(w.sub(f"layers.{i}"), c, c, self.fused)
                          for i in range(self.num_layers, self.num_layers + 3)])
        self.out = (GroupNorm32(w.sub("out.0"), c), Conv1d(w.sub("out.2"), c, self.out_channels, 3, padding=1))
        self._unconditioned_cache = None

    # -- graphs -------------------------------------------------------------------------------------------------
    def _time_embed(self, ctx: Context, timesteps: Tensor) -> Tensor:
        first, second = self.time_embed
        emb = timestep_embedding(ctx, timesteps, self.model_channels)
        return second.forward(ctx, ctx.silu(first.forward(ctx, emb)))

    def build(self, ctx: Context, inputs: pg.Inputs, x: Tensor, timesteps: Tensor, code_emb: Tensor) -> Tensor:
        """forward on sequence data x ne (in_channels, L, B), timesteps ne (B,), code_emb ne (C, L, B)
        -> ne (out_channels, L, B). The trunk runs on sequence data throughout: its attention and 1x1 convolutions
        want it, and the CPU kernels take norms and k3 convolutions there too."""
        f = self.fused
        time_emb = self._time_embed(ctx, timesteps)
        for layer in self.conditioning_timestep_integrator:
            code_emb = layer.forward(ctx, inputs, code_emb, time_emb)
        x = self.inp_block.forward_sequence(ctx, x, fused=f)
        x = ctx.concat(x, code_emb, 0)
        x = self.integrating_conv.forward_sequence(ctx, x, fused=f)
        for lyr in self.layers:
            x = (lyr.forward(ctx, inputs, x, time_emb) if isinstance(lyr, DiffusionLayer)
                 else lyr.forward(ctx, x, time_emb))
        out_norm, out_conv = self.out
        return out_conv.forward_sequence(ctx, out_norm.forward_sequence(ctx, x, silu=True, fused=f), fused=f)

    # -- the reference's methods (numpy in and out) ------------------------------------------------------------
    def get_conditioning(self, conditioning_input) -> np.ndarray:
        """Diffusion conditioning latent (B, 2*model_channels) from mels (B, in_channels, T) or several clips
        (B, clips, in_channels, T): the contextual embedder's output, averaged over the frames of all clips."""
        cond = np.asarray(conditioning_input)
        if cond.ndim == 3:
            cond = cond[:, None]
        cond = floats(cond, "conditioning_input", 4)
        b, clips, ch, t = cond.shape
        if ch != self.in_channels:
            raise ValueError(f"conditioning_input has {ch} mel channels (shape {cond.shape}), the model takes "
                             f"{self.in_channels}")
        # every clip runs through the embedder on its own: batching the clips gives the same result
        inputs = pg.Inputs(ctx := Context())
        h = inputs.add(cond.reshape(b * clips, ch, t))
        conv0, conv1, blocks = self.contextual_embedder
        h = conv1.forward(ctx, conv0.forward(ctx, h))
        for block in blocks:
            h = block.forward(ctx, h, inputs)
        self.compute(h, inputs=inputs)
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
            aligned = floats(aligned, "aligned_conditioning (latents)", 3)
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
        cond = floats(conditioning_latent, "conditioning_latent", 2)
        if cond.shape != (b, 2 * self.model_channels):
            raise ValueError(f"conditioning_latent must be ({b}, {2 * self.model_channels}), got shape {cond.shape}")
        if int(expected_seq_len) != expected_seq_len or expected_seq_len < 1:
            raise ValueError(f"expected_seq_len must be a positive integer, got {expected_seq_len!r}")
        expected_seq_len = int(expected_seq_len)

        c = self.model_channels
        inputs = pg.Inputs(ctx := Context())
        if is_latent(aligned):
            conv, blocks = self.latent_conditioner
            code_emb = conv.forward(ctx, inputs.add(np.ascontiguousarray(aligned.transpose(0, 2, 1))))
        else:
            ids = inputs.add(aligned.astype(np.int32).reshape(-1), "i32")
            rows = ctx.reshape(self.code_embedding.forward(ctx, ids), c, s, b)      # ne (C, S, B)
            code_emb, blocks = layers.to_sequence(ctx, rows), self.code_converter
        for block in blocks:
            code_emb = block.forward(ctx, code_emb, inputs)
        # torch.chunk(conditioning_latent, 2, dim=1): scale, shift, each broadcast over the frames
        cond_scale = inputs.add(cond[:, :c].reshape(b, c, 1))
        cond_shift = inputs.add(cond[:, c:].reshape(b, c, 1))
        code_emb = ctx.add(ctx.mul(self.code_norm.forward(ctx, code_emb), ctx.scale_bias(cond_scale, 1.0, 1.0)),
                           cond_shift)
        self.compute(code_emb, inputs=inputs)
        code_emb = code_emb.get().reshape(b, c, s)
        expanded_code_emb = np.ascontiguousarray(code_emb[:, :, nearest_indices(s, expected_seq_len)])
        if not return_code_pred:
            return expanded_code_emb
        inputs = pg.Inputs(ctx := Context())
        mel_pred = self.mel_head.forward(ctx, inputs.add(expanded_code_emb))
        self.compute(mel_pred, inputs=inputs)
        return expanded_code_emb, mel_pred.get().reshape(b, self.in_channels, expected_seq_len)

    def forward(self, x, timesteps, aligned_conditioning=None, conditioning_latent=None,
                precomputed_aligned_embeddings=None, conditioning_free=False) -> np.ndarray:
        """The model's output (B, out_channels, L) for noisy mels ``x`` (B, in_channels, L) at ``timesteps`` (B,)
        (the original 0..3999 scale).

        Conditioning: ``precomputed_aligned_embeddings`` (B, model_channels, L) from timestep_independent, or
        ``aligned_conditioning`` + ``conditioning_latent`` (computed here). ``conditioning_free``: True replaces
        the conditioning by the learned unconditioned embedding; a sequence of B bools does so per entry, which is
        how one graph computes both halves of conditioning-free guidance."""
        x = floats(x, "x", 3)
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
        # (B, L, C): the memory of the graph's sequence data
        code_emb = np.empty((b, length, self.model_channels), dtype=np.float32)
        if not free.all():
            if precomputed_aligned_embeddings is None:
                if aligned_conditioning is None or conditioning_latent is None:
                    raise ValueError("forward needs precomputed_aligned_embeddings or aligned_conditioning and "
                                     "conditioning_latent")
                pre = self.timestep_independent(aligned_conditioning, conditioning_latent, length)
            else:
                pre = floats(precomputed_aligned_embeddings, "precomputed_aligned_embeddings", 3)
            if pre.shape != (b, self.model_channels, length):
                raise ValueError(f"the aligned embeddings are {pre.shape}, expected {(b, self.model_channels, length)}")
            code_emb[~free] = pre[~free].transpose(0, 2, 1)
        if free.any():
            code_emb[free] = self._unconditioned().transpose(0, 2, 1)
        return self._run_step(x, ts.astype(np.float32), code_emb)

    __call__ = forward

    def _unconditioned(self) -> np.ndarray:
        """unconditioned_embedding as (1, C, 1), to broadcast over the frames (read from the backend once)."""
        if self._unconditioned_cache is None:
            self._unconditioned_cache = self.unconditioned_embedding.get().reshape(1, self.model_channels, 1)
        return self._unconditioned_cache

    def _run_step(self, x: np.ndarray, ts: np.ndarray, cs: np.ndarray) -> np.ndarray:
        """One step on x (B, in_channels, L) with the code embeddings cs (B, L, C) (sequence data's memory)."""
        xs = np.ascontiguousarray(x.transpose(0, 2, 1))

        def build(ctx, inputs):
            tx, tt, tc = inputs.add(xs), inputs.add(ts), inputs.add(cs)
            return {"x": tx, "timesteps": tt, "code_emb": tc}, self.build(ctx, inputs, tx, tt, tc)

        # one graph per input shape: every sampling step recomputes it with new inputs
        out, = self.graphs.compute(x.shape, build, x=xs, timesteps=ts, code_emb=cs)
        return np.ascontiguousarray(out.get().reshape(x.shape[0], x.shape[2], self.out_channels).transpose(0, 2, 1))


__all__ = ["DiffusionTts", "DiffusionLayer", "ResBlock", "timestep_embedding", "nearest_indices"]
