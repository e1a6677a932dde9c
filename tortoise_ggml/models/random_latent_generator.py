"""RandomLatentConverter (tortoise/models/random_latent_generator.py) as a ggml graph: Gaussian noise -> a
conditioning latent for the "random" voice (rlg_auto: the autoregressive model's, rlg_diffuser: the diffusion
model's).

The reference's forward ignores its argument except for the batch size and draws ``torch.randn(b, channels)``
itself. Here the noise is an explicit input (``forward(noise)``), and ``sample(rng)`` draws it from a numpy
Generator: the same seed gives other noise than torch's, so other random voices than tortoise's.
"""
from __future__ import annotations

import math

import numpy as np

from pyggml import Context, Tensor

from ..utils.checks import as_generator, floats
from .arch_util import Linear, ModuleWeights
from .base import Model


def fused_leaky_relu(ctx: Context, input: Tensor, bias: Tensor | None = None, negative_slope: float = 0.2,
                     scale: float = 2 ** 0.5) -> Tensor:
    """leaky_relu(input + bias) * scale; the sqrt 2 gain keeps the activations' variance through the layers."""
    if bias is not None:
        input = ctx.add(input, bias)
    return ctx.scale(ctx.leaky_relu(input, negative_slope), scale)


class EqualLinear:
    """StyleGAN's equalised-learning-rate linear layer: the stored weight and bias are scaled at run time (by
    lr_mul / sqrt(in_dim) and lr_mul), then fused leaky ReLU."""

    def __init__(self, w: ModuleWeights, in_dim: int, out_dim: int, lr_mul: float, negative_slope: float):
        self.weight = w("weight", (out_dim, in_dim))
        self.bias = w("bias", (out_dim,))
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul
        self.negative_slope = negative_slope

    def forward(self, ctx: Context, input: Tensor) -> Tensor:
        # (W * scale) x computed as scale * (W x): the stored weight may be quantized, and the scale is a scalar
        out = ctx.scale(ctx.mul_mat(self.weight, input), self.scale)
        return fused_leaky_relu(ctx, out, ctx.scale(self.bias, self.lr_mul), self.negative_slope)


class RandomLatentConverter(Model):
    """``RandomLatentConverter(model_file, component="rlg_auto")(noise)``: noise (B, channels) -> latents
    (B, channels). The component is rlg_auto or rlg_diffuser (one class, two registry entries)."""

    component = "rlg_auto"

    def __init__(self, model_file, backend=None, component: str | None = None):
        if component not in (None, "rlg_auto", "rlg_diffuser"):
            raise ValueError(f"component must be one of rlg_auto, rlg_diffuser, not {component!r}")
        super().__init__(model_file, backend, component)
        cfg = self.config
        self.channels = c = cfg.channels
        # nn.Sequential(*[EqualLinear(channels, channels, lr_mul) for _ in range(n)], nn.Linear(channels, channels))
        layers = self.weights.sub("layers")
        self.layers = [EqualLinear(layers.sub(str(i)), c, c, cfg.lr_mul, cfg.negative_slope)
                       for i in range(cfg.equal_linear_layers)]
        self.layers.append(Linear(layers.sub(str(cfg.equal_linear_layers)), c, c))

    def build(self, ctx: Context, r: Tensor) -> Tensor:
        """The graph on noise ``r`` ne (channels, B) -> ne (channels, B)."""
        y = r
        for layer in self.layers:
            y = layer.forward(ctx, y)
        return y

    def forward(self, noise) -> np.ndarray:
        """Latents for noise (B, channels) (a (channels,) vector counts as B = 1): float32 (B, channels)."""
        r = floats(noise, "noise")
        if r.ndim == 1:
            r = r[None]
        if r.ndim != 2 or r.shape[1] != self.channels:
            raise ValueError(f"noise must be (batch, {self.channels}) for {self.component}, got shape {r.shape}")

        def build(ctx, inputs):
            x = inputs.add(r)
            return {"noise": x}, self.build(ctx, x)

        y, = self.graphs.compute(r.shape, build, noise=r)
        return y.get().reshape(r.shape)  # ggml drops the unit batch dimension

    __call__ = forward

    def sample(self, rng=None, batch: int = 1) -> np.ndarray:
        """Random latents (batch, channels) from standard normal noise drawn with ``rng`` (a numpy Generator or a
        seed; None: fresh OS entropy), as tortoise's get_random_conditioning_latents draws torch.randn noise."""
        rng = as_generator(rng)
        if int(batch) != batch or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch}")
        return self.forward(rng.standard_normal((int(batch), self.channels), dtype=np.float32))
