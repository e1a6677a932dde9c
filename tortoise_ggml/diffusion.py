"""The diffusion sampler tortoise uses for inference, in numpy (tortoise/utils/diffusion.py + the helpers of
tortoise/api.py: load_discrete_vocoder_diffuser, do_spectrogram_diffusion), tortoise-tts 3.0.0.

Only what inference runs is here: the linear beta schedule, timestep spacing, SpacedDiffusion's ancestral
p_sample loop with epsilon prediction, the learned-range variance, clipping of the predicted x_0, and
conditioning-free guidance with the k ramp. The model is a tortoise_ggml.models.diffusion_decoder.DiffusionTts
(or anything with its ``forward(x, timesteps, precomputed_aligned_embeddings=..., conditioning_free=...)``).

Precision mirrors the reference: the schedule is float64, each per-step coefficient is cast to float32 before use
(the reference's _extract_into_tensor) and the step arithmetic is float32 in the reference's order.

Noise comes from a numpy Generator (``rng``, or a seed): the same seed gives other noise than torch's, so other
(equally valid) spectrograms than tortoise's.

Conditioning-free guidance: one model call per step computes the conditioned and the unconditioned output as one
batch of 2 (the reference makes two calls). The k ramp follows the reference's code:
cfk = k * (1 - t / N) where t is the *spaced* step index (N-1 .. 0) and N the number of spaced steps, since
SpacedDiffusion._scale_timesteps returns its argument unchanged.
"""
from __future__ import annotations

import enum

import numpy as np

from .models.diffusion_decoder import output_seq_len

# tortoise/utils/audio.py: the range the diffusion model's mels are normalised to [-1, 1] from
TACOTRON_MEL_MAX = 2.3143386840820312
TACOTRON_MEL_MIN = -11.512925148010254


def denormalize_tacotron_mel(norm_mel: np.ndarray) -> np.ndarray:
    return ((norm_mel + 1) / 2) * (TACOTRON_MEL_MAX - TACOTRON_MEL_MIN) + TACOTRON_MEL_MIN


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """The 'linear' schedule of Ho et al., scaled so any step count covers the same range (the one tortoise uses)."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        beta_start = scale * 0.0001
        beta_end = scale * 0.02
        return np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
    raise NotImplementedError(f"unknown beta schedule: {schedule_name} (tortoise's inference uses 'linear')")


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """The timesteps of the original process to keep: each of len(section_counts) equal portions strided down
    to its count, or ``"ddimN"`` for the DDIM paper's fixed integer stride."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {num_timesteps} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        if section_count <= 1:
            frac_stride = 1
        else:
            frac_stride = (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


class ModelMeanType(enum.Enum):
    EPSILON = "epsilon"  # the model predicts the noise


class ModelVarType(enum.Enum):
    LEARNED_RANGE = "learned_range"  # the model interpolates between the posterior's and beta's log variance


def _f32(arr: np.ndarray, t: int) -> np.float32:
    """_extract_into_tensor: the reference casts the whole float64 table to float32, then indexes it."""
    return np.float32(arr[t])


class GaussianDiffusion:
    """The diffusion process over ``betas`` (float64), for sampling."""

    def __init__(self, *, betas, model_mean_type="epsilon", model_var_type="learned_range", loss_type="mse",
                 rescale_timesteps=False, conditioning_free=False, conditioning_free_k=1,
                 ramp_conditioning_free=True):
        self.model_mean_type = ModelMeanType(model_mean_type)
        self.model_var_type = ModelVarType(model_var_type)
        if loss_type != "mse":
            raise ValueError(f"loss_type {loss_type!r}: only training uses it, and tortoise's diffuser uses 'mse'")
        if rescale_timesteps:
            raise ValueError("rescale_timesteps: tortoise's diffusion model takes the original timesteps")
        self.rescale_timesteps = rescale_timesteps
        self.conditioning_free = conditioning_free
        self.conditioning_free_k = conditioning_free_k
        self.ramp_conditioning_free = ramp_conditioning_free

        betas = np.array(betas, dtype=np.float64)
        self.betas = betas
        if betas.ndim != 1:
            raise ValueError("betas must be 1-D")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # the posterior q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # clipped: the posterior variance is 0 at the first step
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1],
                                                               self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(self.betas)

    def _model_timesteps(self, t: int) -> int:
        """The timestep the model sees for step ``t``."""
        return t

    def _scale_timesteps(self, t: int) -> int:
        return t

    def q_posterior_mean_variance(self, x_start: np.ndarray, x_t: np.ndarray, t: int) -> np.ndarray:
        """The posterior mean (its variance is not needed: the model predicts its own)."""
        return _f32(self.posterior_mean_coef1, t) * x_start + _f32(self.posterior_mean_coef2, t) * x_t

    def _predict_xstart_from_eps(self, x_t: np.ndarray, t: int, eps: np.ndarray) -> np.ndarray:
        return _f32(self.sqrt_recip_alphas_cumprod, t) * x_t - _f32(self.sqrt_recipm1_alphas_cumprod, t) * eps

    def p_mean_variance(self, model, x: np.ndarray, t: int, clip_denoised: bool = True,
                        model_kwargs: dict | None = None) -> dict:
        """p(x_{t-1} | x_t): mean, log variance and the predicted x_0, from one model call (both halves of
        conditioning-free guidance in one batch)."""
        model_kwargs = model_kwargs or {}
        b, c = x.shape[:2]
        ts = self._model_timesteps(t)
        if self.conditioning_free:
            # the batch doubles: per-entry conditioning (embeddings, latents) is repeated for the second half,
            # which ignores it
            kwargs = {k: np.concatenate([v, v]) if isinstance(v, np.ndarray) and v.ndim and len(v) == b else v
                      for k, v in model_kwargs.items()}
            both = model(np.concatenate([x, x]), np.full((2 * b,), ts),
                         conditioning_free=np.repeat([False, True], b), **kwargs)
            model_output, model_output_no_conditioning = both[:b], both[b:]
        else:
            model_output = model(x, np.full((b,), ts), **model_kwargs)
        if model_output.shape != (b, 2 * c, *x.shape[2:]):
            raise ValueError(f"the model gave {model_output.shape}, expected {(b, 2 * c, *x.shape[2:])} "
                             "(noise and variance for each channel)")
        model_output, model_var_values = model_output[:, :c], model_output[:, c:]
        if self.conditioning_free:
            model_output_no_conditioning = model_output_no_conditioning[:, :c]
        min_log = _f32(self.posterior_log_variance_clipped, t)
        max_log = _f32(self.log_betas, t)
        # model_var_values in [-1, 1] span [min_var, max_var]
        frac = (model_var_values + np.float32(1)) / np.float32(2)
        model_log_variance = frac * max_log + (np.float32(1) - frac) * min_log

        if self.conditioning_free:
            if self.ramp_conditioning_free:
                cfk = self.conditioning_free_k * (1 - self._scale_timesteps(t) / self.num_timesteps)
            else:
                cfk = self.conditioning_free_k
            model_output = np.float32(1 + cfk) * model_output - np.float32(cfk) * model_output_no_conditioning

        pred_xstart = self._predict_xstart_from_eps(x, t, model_output)
        if clip_denoised:
            pred_xstart = np.clip(pred_xstart, -1, 1)
        model_mean = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": model_mean, "log_variance": model_log_variance, "pred_xstart": pred_xstart}

    def p_sample(self, model, x: np.ndarray, t: int, noise: np.ndarray, clip_denoised: bool = True,
                 model_kwargs: dict | None = None) -> dict:
        """x_{t-1} from x_t, with the standard normal ``noise`` (unused at t = 0, as in the reference)."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        nonzero_mask = np.float32(t != 0)
        sample = out["mean"] + nonzero_mask * np.exp(np.float32(0.5) * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop_progressive(self, model, shape, noise: np.ndarray | None = None, clip_denoised: bool = True,
                                  model_kwargs: dict | None = None, rng=None, progress=False):
        """Yields p_sample's result for each step, from the last timestep down to 0."""
        rng = _rng(rng)
        img = noise if noise is not None else rng.standard_normal(shape, dtype=np.float32)
        if tuple(img.shape) != tuple(shape):
            raise ValueError(f"noise has shape {img.shape}, expected {tuple(shape)}")
        img = np.ascontiguousarray(img, dtype=np.float32)
        indices = list(range(self.num_timesteps))[::-1]
        for i in _progress(indices, progress):
            # the reference draws every step's noise, the last step's too (it is masked out)
            out = self.p_sample(model, img, i, rng.standard_normal(img.shape, dtype=np.float32),
                                clip_denoised=clip_denoised, model_kwargs=model_kwargs)
            yield out
            img = out["sample"]

    def p_sample_loop(self, model, shape, noise: np.ndarray | None = None, clip_denoised: bool = True,
                      model_kwargs: dict | None = None, rng=None, progress=False) -> np.ndarray:
        final = None
        for sample in self.p_sample_loop_progressive(model, shape, noise=noise, clip_denoised=clip_denoised,
                                                     model_kwargs=model_kwargs, rng=rng, progress=progress):
            final = sample
        return final["sample"]


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion process that keeps only ``use_timesteps`` of a base process (its betas recomputed so the
    kept steps have the base's cumulative alphas); the model still sees the original timestep numbers."""

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map = []
        self.original_num_steps = len(kwargs["betas"])
        base_diffusion = GaussianDiffusion(**kwargs)
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base_diffusion.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)

    def _model_timesteps(self, t: int) -> int:
        """_WrappedModel: spaced step index -> original timestep."""
        return self.timestep_map[t]


def load_discrete_vocoder_diffuser(trained_diffusion_steps: int = 4000, desired_diffusion_steps: int = 200,
                                   cond_free: bool = True, cond_free_k: float = 1) -> SpacedDiffusion:
    """The diffuser tortoise/api.py samples mels with."""
    return SpacedDiffusion(use_timesteps=space_timesteps(trained_diffusion_steps, [desired_diffusion_steps]),
                           model_mean_type="epsilon", model_var_type="learned_range", loss_type="mse",
                           betas=get_named_beta_schedule("linear", trained_diffusion_steps),
                           conditioning_free=cond_free, conditioning_free_k=cond_free_k)


def do_spectrogram_diffusion(diffusion_model, diffuser: GaussianDiffusion, latents, conditioning_latents,
                             temperature: float = 1, verbose: bool = False, rng=None, progress=None) -> np.ndarray:
    """Mel spectrogram (B, 100, S*4*24000//22050) for AR ``latents`` (B, S, D) and the diffusion conditioning
    latent (B, 2*model_channels), as tortoise/api.py's do_spectrogram_diffusion: ``temperature`` scales the
    starting noise; ``rng`` (numpy Generator or seed) draws all noise; ``verbose`` shows a tqdm bar (the
    reference's default is True; a library stays quiet unless asked); ``progress``, a callable
    ``progress(step, total)``, is called before each step instead."""
    latents = np.asarray(latents)
    if latents.ndim < 2:
        raise ValueError(f"latents must be (batch, length, channels), got shape {latents.shape}")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    rng = _rng(rng)
    seq_len = output_seq_len(latents.shape[1])
    output_shape = (latents.shape[0], diffusion_model.in_channels, seq_len)
    precomputed_embeddings = diffusion_model.timestep_independent(latents, conditioning_latents, seq_len, False)
    noise = rng.standard_normal(output_shape, dtype=np.float32) * np.float32(temperature)
    mel = diffuser.p_sample_loop(diffusion_model, output_shape, noise=noise,
                                 model_kwargs={"precomputed_aligned_embeddings": precomputed_embeddings},
                                 rng=rng, progress=progress if progress is not None else verbose)
    return denormalize_tacotron_mel(mel)[:, :, :seq_len]


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _progress(indices: list[int], progress):
    if callable(progress):
        for n, i in enumerate(indices):
            progress(n, len(indices))
            yield i
    elif progress:
        from tqdm import tqdm
        yield from tqdm(indices)
    else:
        yield from indices


__all__ = ["GaussianDiffusion", "SpacedDiffusion", "get_named_beta_schedule", "space_timesteps",
           "load_discrete_vocoder_diffuser", "do_spectrogram_diffusion", "denormalize_tacotron_mel",
           "TACOTRON_MEL_MAX", "TACOTRON_MEL_MIN"]
