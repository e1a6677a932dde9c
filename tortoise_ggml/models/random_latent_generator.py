"""RandomLatentConverter (tortoise/models/random_latent_generator.py) as a ggml graph: Gaussian noise -> a
conditioning latent for the "random" voice (rlg_auto: the autoregressive model's, rlg_diffuser: the diffusion
model's).

The reference's forward ignores its argument except for the batch size and draws ``torch.randn(b, channels)``
itself. Here the noise is an explicit input (``forward(noise)``), and ``sample(rng)`` draws it from a numpy
Generator: the same seed gives other noise than torch's, so other random voices than tortoise's.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

import pyggml as pg
from pyggml import Context, Graph, Tensor

from .. import layers

COMPONENTS = ("rlg_auto", "rlg_diffuser")


def fused_leaky_relu(ctx: Context, input: Tensor, bias: Tensor | None = None, negative_slope: float = 0.2,
                     scale: float = 2 ** 0.5) -> Tensor:
    """leaky_relu(input + bias) * scale; the sqrt 2 gain keeps the activations' variance through the layers."""
    if bias is not None:
        input = ctx.add(input, bias)
    return ctx.scale(ctx.leaky_relu(input, negative_slope), scale)


class EqualLinear:
    """StyleGAN's equalised-learning-rate linear layer: the stored weight and bias are scaled at run time (by
    lr_mul / sqrt(in_dim) and lr_mul), then fused leaky ReLU."""

    def __init__(self, weights: Mapping[str, Tensor], prefix: str, lr_mul: float, negative_slope: float):
        self.weight = weights[f"{prefix}.weight"]
        self.bias = weights[f"{prefix}.bias"]
        in_dim = self.weight.ne[0]
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul
        self.negative_slope = negative_slope

    def forward(self, ctx: Context, input: Tensor) -> Tensor:
        # (W * scale) x computed as scale * (W x): the stored weight may be quantized, and the scale is a scalar
        out = ctx.scale(ctx.mul_mat(self.weight, input), self.scale)
        return fused_leaky_relu(ctx, out, ctx.scale(self.bias, self.lr_mul), self.negative_slope)


class Linear:
    def __init__(self, weights: Mapping[str, Tensor], prefix: str):
        self.weight = weights[f"{prefix}.weight"]
        self.bias = weights[f"{prefix}.bias"]

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        return layers.linear(ctx, x, self.weight, self.bias)


class RandomLatentConverter:
    """``RandomLatentConverter(model_file, "rlg_auto")(noise)``: noise (B, channels) -> latents (B, channels).

    ``backend`` defaults to the model file's; the weights must live where it can read them."""

    def __init__(self, model_file, component: str, backend: pg.Backend | None = None):
        if component not in COMPONENTS:
            raise ValueError(f"component must be one of {', '.join(COMPONENTS)}, not {component!r}")
        hp = model_file.hparams(component)
        try:
            self.channels = int(hp["channels"])
            n_equal = int(hp["equal_linear_layers"])
            lr_mul = float(hp["lr_mul"])
            negative_slope = float(hp["negative_slope"])
        except KeyError as e:
            raise KeyError(f"{component} hparams lack {e.args[0]!r}") from None
        weights = model_file.weights(component)
        self.component = component
        self.backend = backend or model_file.backend
        # nn.Sequential(*[EqualLinear(channels, channels, lr_mul) for _ in range(n)], nn.Linear(channels, channels))
        self.layers = [EqualLinear(weights, f"layers.{i}", lr_mul, negative_slope) for i in range(n_equal)]
        self.layers.append(Linear(weights, f"layers.{n_equal}"))
        for layer in self.layers:
            if tuple(layer.weight.ne[:2]) != (self.channels, self.channels):
                raise ValueError(f"{component}: weight {layer.weight!r} is not {self.channels}x{self.channels}")

    def build(self, ctx: Context, r: Tensor) -> Tensor:
        """The graph on noise ``r`` ne (channels, B) -> ne (channels, B)."""
        y = r
        for layer in self.layers:
            y = layer.forward(ctx, y)
        return y

    def forward(self, noise) -> np.ndarray:
        """Latents for noise (B, channels) (a (channels,) vector counts as B = 1): float32 (B, channels)."""
        r = np.asarray(noise)
        if r.dtype.kind != "f":
            raise TypeError(f"noise must be floating point, got dtype {r.dtype}")
        if r.ndim == 1:
            r = r[None]
        if r.ndim != 2 or r.shape[1] != self.channels or r.shape[0] == 0:
            raise ValueError(f"noise must be (batch, {self.channels}) for {self.component}, got shape {r.shape}")
        r = np.ascontiguousarray(r, dtype=np.float32)
        ctx = Context()
        x = ctx.new_tensor("f32", (self.channels, r.shape[0])).set_input()
        y = self.build(ctx, x)
        self.backend.compute(Graph(ctx, y), {x: r})
        return y.get().reshape(r.shape)  # ggml drops the unit batch dimension

    __call__ = forward

    def sample(self, rng=None, batch: int = 1) -> np.ndarray:
        """Random latents (batch, channels) from standard normal noise drawn with ``rng`` (a numpy Generator or a
        seed; None: fresh OS entropy), as tortoise's get_random_conditioning_latents draws torch.randn noise."""
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        if int(batch) != batch or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch}")
        return self.forward(rng.standard_normal((int(batch), self.channels), dtype=np.float32))
