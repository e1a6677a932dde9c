"""The diffusion sampler tortoise uses for inference, in numpy (tortoise/utils/diffusion.py, tortoise-tts 3.0.0;
tortoise/api.py's glue around it, load_discrete_vocoder_diffuser and do_spectrogram_diffusion, is in api.py).

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

Samplers (``SAMPLERS``, as tortoise-tts-fast names them; pick one with ``sampler=`` when building the diffuser,
then call ``diffuser.sample_loop(model, shape, ...)``, or ``sample_loop(diffuser, sampler, model, shape, ...)``):

* ``"p"``: tortoise's ancestral p_sample loop over the spaced timesteps (the default).
* ``"ddim"``: tortoise-tts 3.0.0's own GaussianDiffusion.ddim_sample_loop (eta 0: deterministic) over the same
  spaced timesteps, through p_mean_variance, so with the same clipping and conditioning-free guidance (k ramp).
* ``"dpm++2m"``: DPM-Solver++ multistep, order 2 (LuChengTHU/dpm-solver, dpm_solver_pytorch.py: NoiseScheduleVP
  'discrete', model_wrapper model_type "noise" with guidance "classifier-free", DPM_Solver algorithm_type
  "dpmsolver++", method "multistep", skip_type "time_uniform", lower_order_final) over tortoise's own discrete
  schedule: the *original* betas (``original_betas``, the 4000 linear ones, not the spaced ones) with log(alpha_t)
  piecewise linear in t over t_n = (n+1)/N, from t_T = 1 to t_0 = 1/N in ``num_timesteps`` (= the
  desired_diffusion_steps) time-uniform steps, one model call each. The model sees t on its trained scale,
  (t - 1/N) * N in [0, N-1] (dpm-solver's wrapper writes (t - 1/N) * 1000, for models trained on 1000 steps).
  Guidance is classifier-free with guidance_scale = conditioning_free_k and no ramp:
  eps = uncond + k * (cond - uncond) (tortoise's own is (1 + cfk) * cond - cfk * uncond with the ramp), both in
  one batch-of-2 call as p_mean_variance does (k == 1: the conditioned call alone, as dpm-solver's wrapper).
  With clip_denoised (the default, as tortoise's loops) the data prediction is clipped to [-1, 1] (dpm-solver's
  correcting_x0_fn), which keeps its first-order step exactly DDIM's clipped step. Needs conditioning_free.
* ``"dpm++2m-logsnr"``: the same solver with dpm-solver's skip_type "logSNR" (steps uniform in lambda_t instead
  of t). Not in tortoise-tts-fast. On tortoise's schedule time-uniform steps are sparse where lambda is high: the
  last of 20 steps spans lambda 1.7 .. 5.3 and the multistep extrapolates over it ~5x the previous step, which is
  where a sample's fine detail forms. On the toy models of tests/test_samplers.py it lands 5x (10 steps) to 15x
  (20 steps) closer to the ODE's solution than time-uniform dpm++2m, and converges at second order from 10 steps
  (time-uniform: only past ~100).
* ``"dpm++2m-fast"``: tortoise-tts-fast's own dpm++2m, for comparison: the same solver over a *continuous* linear
  schedule NoiseScheduleVP('linear', 0.025, 5.0), model time t * 1000 (t from 1 to 1e-3), no clipping. That is not
  tortoise's diffusion (its 4000 betas are beta(t) = 0.1..20 on a 4000-step time scale), so it solves another ODE
  and its samples do not approach a many-step DDIM of the same noise.

DDIM (eta 0) and DPM-Solver++ integrate the same probability-flow ODE when the guided noise prediction is the
same: ``ddim`` with conditioning_free_k = k - 1 and no ramp against ``dpm++2m`` with k (``sampler_convergence``
measures both against a many-step DDIM of the same noise).
"""
from __future__ import annotations

import enum

import numpy as np

from .checks import as_generator

SAMPLERS = ("p", "ddim", "dpm++2m", "dpm++2m-logsnr", "dpm++2m-fast")
DPM_SAMPLERS = ("dpm++2m", "dpm++2m-logsnr", "dpm++2m-fast")


def check_sampler(sampler, conditioning_free: bool = True) -> str:
    """``sampler`` if it is one of SAMPLERS and can run with ``conditioning_free``, else a ValueError naming why."""
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if sampler in DPM_SAMPLERS and not conditioning_free:
        raise ValueError(f"sampler {sampler!r} needs conditioning-free guidance (cond_free=True), as in "
                         "tortoise-tts-fast")
    return sampler


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
        if section_count < 1:
            raise ValueError(f"diffusion steps must be at least 1, got {section_count}")
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count} "
                             f"(at most {size} diffusion steps)")
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
                 ramp_conditioning_free=True, sampler="p"):
        self.sampler = check_sampler(sampler, conditioning_free)
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
        self.original_betas = betas   # the schedule the DPM-Solver samplers use (SpacedDiffusion: the base one)
        if betas.ndim != 1 or not betas.size:
            raise ValueError(f"betas must be 1-D and not empty, got shape {betas.shape}")
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
        # clipped: the posterior variance is 0 at the first step (one step only, where the reference fails with an
        # IndexError: beta's, unused as that step adds no noise)
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
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

    def _predict_eps_from_xstart(self, x_t: np.ndarray, t: int, pred_xstart: np.ndarray) -> np.ndarray:
        return (_f32(self.sqrt_recip_alphas_cumprod, t) * x_t - pred_xstart) / _f32(self.sqrt_recipm1_alphas_cumprod, t)

    def p_mean_variance(self, model, x: np.ndarray, t: int, clip_denoised: bool = True,
                        model_kwargs: dict | None = None) -> dict:
        """p(x_{t-1} | x_t): mean, log variance and the predicted x_0, from one model call (both halves of
        conditioning-free guidance in one batch)."""
        c = x.shape[1]
        model_output, model_output_no_conditioning = _call_model(model, x, self._model_timesteps(t),
                                                                 model_kwargs, self.conditioning_free)
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
        rng = as_generator(rng)
        img = _start_noise(shape, noise, rng)
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

    # --------------------------------------------------------------------------------------------------------------
    # DDIM (tortoise-tts 3.0.0's GaussianDiffusion.ddim_sample / ddim_sample_loop)
    # --------------------------------------------------------------------------------------------------------------
    def ddim_sample(self, model, x: np.ndarray, t: int, clip_denoised: bool = True, model_kwargs: dict | None = None,
                    eta: float = 0.0, noise: np.ndarray | None = None) -> dict:
        """x_{t-1} from x_t by DDIM (Song et al., eq. 12); ``noise`` (standard normal) only matters for eta > 0."""
        if eta and noise is None:
            raise ValueError("ddim_sample with eta > 0 needs the step's noise")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        # re-derived from the (clipped) x_0, as the reference does
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _f32(self.alphas_cumprod, t)
        alpha_bar_prev = _f32(self.alphas_cumprod_prev, t)
        one = np.float32(1)
        sigma = (np.float32(eta) * np.sqrt((one - alpha_bar_prev) / (one - alpha_bar))
                 * np.sqrt(one - alpha_bar / alpha_bar_prev))
        mean_pred = out["pred_xstart"] * np.sqrt(alpha_bar_prev) + np.sqrt(one - alpha_bar_prev - sigma ** 2) * eps
        sample = mean_pred + sigma * noise if (t != 0 and sigma != 0) else mean_pred
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop_progressive(self, model, shape, noise: np.ndarray | None = None, clip_denoised: bool = True,
                                     model_kwargs: dict | None = None, rng=None, progress=False, eta: float = 0.0):
        """Yields ddim_sample's result for each step, from the last timestep down to 0."""
        if not (np.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        rng = as_generator(rng)
        img = _start_noise(shape, noise, rng)
        for i in _progress(list(range(self.num_timesteps))[::-1], progress):
            # the reference draws each step's noise (randn_like); with eta 0 it is unused, so none is drawn
            step_noise = rng.standard_normal(img.shape, dtype=np.float32) if eta else None
            out = self.ddim_sample(model, img, i, clip_denoised=clip_denoised, model_kwargs=model_kwargs, eta=eta,
                                   noise=step_noise)
            yield out
            img = out["sample"]

    def ddim_sample_loop(self, model, shape, noise: np.ndarray | None = None, clip_denoised: bool = True,
                         model_kwargs: dict | None = None, rng=None, progress=False, eta: float = 0.0) -> np.ndarray:
        final = None
        for sample in self.ddim_sample_loop_progressive(model, shape, noise=noise, clip_denoised=clip_denoised,
                                                        model_kwargs=model_kwargs, rng=rng, progress=progress,
                                                        eta=eta):
            final = sample
        return final["sample"]

    # --------------------------------------------------------------------------------------------------------------
    # DPM-Solver++(2M)
    # --------------------------------------------------------------------------------------------------------------
    def noise_schedule(self, sampler: str = "dpm++2m") -> NoiseScheduleVP:
        """The continuous-time schedule a DPM-Solver sampler integrates over: tortoise's own (the original betas,
        discrete), or tortoise-tts-fast's continuous linear one for ``"dpm++2m-fast"``."""
        if sampler == "dpm++2m-fast":
            return NoiseScheduleVP("linear", continuous_beta_0=0.1 / 4, continuous_beta_1=20.0 / 4)
        return NoiseScheduleVP("discrete", betas=self.original_betas)

    def dpm_solver_sample_loop(self, model, shape, noise: np.ndarray | None = None, clip_denoised: bool = True,
                               model_kwargs: dict | None = None, rng=None, progress=False,
                               sampler: str = "dpm++2m") -> np.ndarray:
        """DPM-Solver++(2M) in ``self.num_timesteps`` model calls (see the module docstring): ``"dpm++2m"``
        time-uniform steps, ``"dpm++2m-logsnr"`` logSNR-uniform ones, ``"dpm++2m-fast"`` tortoise-tts-fast's
        variant (continuous schedule, time-uniform, no clipping)."""
        if sampler not in DPM_SAMPLERS:
            raise ValueError(f"dpm_solver_sample_loop runs {', '.join(DPM_SAMPLERS)}, not {sampler!r}")
        check_sampler(sampler, self.conditioning_free)
        ns = self.noise_schedule(sampler)
        steps = self.num_timesteps
        img = _start_noise(shape, noise, as_generator(rng))
        c = img.shape[1]
        k = self.conditioning_free_k
        clip = clip_denoised and sampler != "dpm++2m-fast"
        times = ns.time_steps("logSNR" if sampler == "dpm++2m-logsnr" else "time_uniform", ns.T, 1.0 / ns.total_N,
                              steps)
        log_alpha = ns.marginal_log_mean_coeff(times)
        alpha, sigma = np.exp(log_alpha), ns.marginal_std(times)
        model_time = ns.model_time(times).astype(np.float32)
        ticks = _progress(list(range(steps)), progress)

        def data_prediction(x, i):
            next(ticks)
            cond, uncond = _call_model(model, x, model_time[i], model_kwargs, k != 1)
            eps = cond[:, :c] if k == 1 else uncond[:, :c] + np.float32(k) * (cond[:, :c] - uncond[:, :c])
            # in float64: at high noise this divides by alpha_T = 0.0065 (tortoise's schedule), which would make
            # float32 rounding of x - sigma * eps count 150x
            x0 = ((x.astype(np.float64) - sigma[i] * eps.astype(np.float64)) / alpha[i]).astype(np.float32)
            return np.clip(x0, -1, 1) if clip else x0

        x = _dpm_solver_pp_multistep(data_prediction, img, ns.marginal_lambda(times), alpha, sigma, order=2)
        for _ in ticks:   # close a progress bar
            pass
        return x

    # --------------------------------------------------------------------------------------------------------------
    def sample_loop(self, model, shape, noise: np.ndarray | None = None, clip_denoised: bool = True,
                    model_kwargs: dict | None = None, rng=None, progress=False, sampler: str | None = None
                    ) -> np.ndarray:
        """The sample by ``sampler`` (default: the one the diffuser was built with), p_sample_loop's arguments.
        ``progress``: True for a tqdm bar, or a callable ``progress(step, total)`` called before each model call."""
        sampler = check_sampler(self.sampler if sampler is None else sampler, self.conditioning_free)
        kwargs = {"noise": noise, "clip_denoised": clip_denoised, "model_kwargs": model_kwargs, "rng": rng,
                  "progress": progress}
        if sampler == "p":
            return self.p_sample_loop(model, shape, **kwargs)
        if sampler == "ddim":
            return self.ddim_sample_loop(model, shape, **kwargs)
        return self.dpm_solver_sample_loop(model, shape, sampler=sampler, **kwargs)


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
        if not self.timestep_map:
            raise ValueError("use_timesteps keeps none of the diffusion steps: sampling needs at least 1")
        if not self.use_timesteps <= set(range(self.original_num_steps)):
            raise ValueError(f"use_timesteps must lie in [0, {self.original_num_steps}), got "
                             f"{sorted(self.use_timesteps - set(range(self.original_num_steps)))[:5]}")
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self.original_betas = base_diffusion.betas   # the whole schedule, for the DPM-Solver samplers

    def _model_timesteps(self, t: int) -> int:
        """_WrappedModel: spaced step index -> original timestep."""
        return self.timestep_map[t]


def sample_loop(diffuser: GaussianDiffusion, sampler: str, model, shape, noise: np.ndarray | None = None,
                model_kwargs: dict | None = None, rng=None, progress=False, clip_denoised: bool = True) -> np.ndarray:
    """``diffuser.sample_loop`` with ``sampler`` (one of SAMPLERS) instead of the diffuser's own."""
    return diffuser.sample_loop(model, shape, noise=noise, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                                rng=rng, progress=progress, sampler=sampler)


# ------------------------------------------------------------------------------------------------------------------
# DPM-Solver (LuChengTHU/dpm-solver, dpm_solver_pytorch.py), in numpy: the schedule in float64, each step's
# coefficients cast to float32, the samples float32
# ------------------------------------------------------------------------------------------------------------------
class NoiseScheduleVP:
    """The forward SDE q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I), t in [0, 1], as dpm-solver's NoiseScheduleVP.

    'discrete' (``betas`` of a model trained on n = 0..N-1): log(alpha_t) piecewise linear in t through
    (t_n = (n+1)/N, log sqrt(alphas_cumprod[n])); the model sees ``model_time(t)`` = (t - 1/N) * N, its own
    timestep scale. 'linear': the continuous VP-SDE with beta(t) = beta_0 + t (beta_1 - beta_0); the model sees
    t * 1000 (tortoise-tts-fast's choice)."""

    def __init__(self, schedule: str = "discrete", betas=None, continuous_beta_0: float = 0.1,
                 continuous_beta_1: float = 20.0):
        self.schedule = schedule
        self.T = 1.0
        if schedule == "discrete":
            betas = np.asarray(betas, dtype=np.float64)
            if betas.ndim != 1 or betas.size < 2:
                raise ValueError(f"a discrete schedule needs at least 2 betas, got shape {betas.shape}")
            self.log_alpha_array = self._numerical_clip_alpha(0.5 * np.cumsum(np.log1p(-betas)))
            self.total_N = len(self.log_alpha_array)
            self.t_array = np.linspace(0.0, 1.0, self.total_N + 1)[1:]
        elif schedule == "linear":
            self.total_N = 1000
            self.beta_0, self.beta_1 = float(continuous_beta_0), float(continuous_beta_1)
        else:
            raise ValueError(f"unknown noise schedule {schedule!r}: 'discrete' or 'linear'")

    @staticmethod
    def _numerical_clip_alpha(log_alphas: np.ndarray, clipped_lambda: float = -5.1) -> np.ndarray:
        """Drop the last steps whose half-log-SNR is below ``clipped_lambda`` (tortoise's schedule ends at -5.03,
        so none are dropped)."""
        lambs = log_alphas - 0.5 * np.log(-np.expm1(2.0 * log_alphas))
        idx = int(np.searchsorted(lambs[::-1], clipped_lambda, side="left"))
        return log_alphas[:-idx] if idx > 0 else log_alphas

    def marginal_log_mean_coeff(self, t) -> np.ndarray:
        """log(alpha_t)."""
        t = np.asarray(t, dtype=np.float64)
        if self.schedule == "linear":
            return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        return _interpolate(t, self.t_array, self.log_alpha_array)

    def marginal_alpha(self, t) -> np.ndarray:
        return np.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t) -> np.ndarray:
        return np.sqrt(-np.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t) -> np.ndarray:
        """lambda_t = log(alpha_t) - log(sigma_t), the half-log-SNR."""
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        return log_mean_coeff - 0.5 * np.log(-np.expm1(2.0 * log_mean_coeff))

    def inverse_lambda(self, lamb) -> np.ndarray:
        """The t whose lambda_t is ``lamb``."""
        lamb = np.asarray(lamb, dtype=np.float64)
        if self.schedule == "linear":
            tmp = 2.0 * (self.beta_1 - self.beta_0) * np.logaddexp(-2.0 * lamb, 0.0)
            delta = self.beta_0 ** 2 + tmp
            return tmp / (np.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lamb)
        return _interpolate(log_alpha, self.log_alpha_array[::-1], self.t_array[::-1])

    def time_steps(self, skip_type: str, t_T: float, t_0: float, n: int) -> np.ndarray:
        """DPM_Solver.get_time_steps: n + 1 times from t_T down to t_0, uniform in t or in lambda_t."""
        if skip_type == "time_uniform":
            return np.linspace(t_T, t_0, n + 1)
        if skip_type == "logSNR":
            return self.inverse_lambda(np.linspace(self.marginal_lambda(t_T), self.marginal_lambda(t_0), n + 1))
        raise ValueError(f"unknown skip_type {skip_type!r}: 'time_uniform' or 'logSNR'")

    def model_time(self, t) -> np.ndarray:
        """The timestep the model is given at continuous time ``t``."""
        t = np.asarray(t, dtype=np.float64)
        if self.schedule == "discrete":
            return (t - 1.0 / self.total_N) * self.total_N
        return t * 1000.0


def _interpolate(x: np.ndarray, xp: np.ndarray, yp: np.ndarray) -> np.ndarray:
    """dpm-solver's interpolate_fn: linear between the keypoints ``xp`` (increasing), extended linearly past
    the ends."""
    i = np.clip(np.searchsorted(xp, x, side="left") - 1, 0, len(xp) - 2)
    return yp[i] + (x - xp[i]) * (yp[i + 1] - yp[i]) / (xp[i + 1] - xp[i])


def _dpm_solver_pp_multistep(data_prediction, x: np.ndarray, lambdas: np.ndarray, alpha: np.ndarray,
                             sigma: np.ndarray, order: int = 2, lower_order_final: bool = True) -> np.ndarray:
    """DPM_Solver.sample(method="multistep", algorithm_type="dpmsolver++", solver_type="dpmsolver") over the
    time grid whose lambda_t, alpha_t, sigma_t (float64) are given; ``data_prediction(x, i)`` is x_0 at grid point
    i. ``order`` is lowered to the number of steps (one step: DPM-Solver-1, i.e. DDIM)."""
    steps = len(lambdas) - 1
    order = min(order, steps)

    def first_update(x, s, t, model_s):
        phi_1 = np.expm1(-(lambdas[t] - lambdas[s]))
        return np.float32(sigma[t] / sigma[s]) * x - np.float32(alpha[t] * phi_1) * model_s

    def second_update(x, models, prev, t):
        (prev_1, prev_0), (model_prev_1, model_prev_0) = prev[-2:], models[-2:]
        h_0 = lambdas[prev_0] - lambdas[prev_1]
        h = lambdas[t] - lambdas[prev_0]
        d1_0 = np.float32(h / h_0) * (model_prev_0 - model_prev_1)
        phi_1 = np.expm1(-h)
        return (np.float32(sigma[t] / sigma[prev_0]) * x - np.float32(alpha[t] * phi_1) * model_prev_0
                - np.float32(0.5 * (alpha[t] * phi_1)) * d1_0)

    def update(x, models, prev, t, step_order):
        if step_order == 1:
            return first_update(x, prev[-1], t, models[-1])
        return second_update(x, models, prev, t)

    prev, models = [0], [data_prediction(x, 0)]
    for step in range(1, order):   # the first values by lower orders
        x = update(x, models, prev, step, step)
        prev.append(step)
        models.append(data_prediction(x, step))
    for step in range(order, steps + 1):
        step_order = min(order, steps + 1 - step) if lower_order_final and steps < 10 else order
        x = update(x, models, prev, step, step_order)
        prev, models = prev[1:] + [step], models[1:] + [models[-1]]
        if step < steps:   # no model call after the last step
            models[-1] = data_prediction(x, step)
    return x


# ------------------------------------------------------------------------------------------------------------------
# DDIM vs DPM-Solver++ convergence (no weights needed; the benchmark runs it on the real model)
# ------------------------------------------------------------------------------------------------------------------
def _convergence_diffuser(sampler: str, steps: int, cond_free_k: float, trained_diffusion_steps: int):
    """The diffuser for one run of sampler_convergence: ddim with the guidance that equals dpm++'s (k - 1, no
    ramp; conditioning-free only where it changes the output)."""
    if sampler in DPM_SAMPLERS:
        cond_free, k = True, cond_free_k
    else:
        k = cond_free_k - 1
        cond_free = k != 0
    return SpacedDiffusion(use_timesteps=space_timesteps(trained_diffusion_steps, [steps]),
                           model_mean_type="epsilon", model_var_type="learned_range", loss_type="mse",
                           betas=get_named_beta_schedule("linear", trained_diffusion_steps),
                           conditioning_free=cond_free, conditioning_free_k=k, ramp_conditioning_free=False,
                           sampler=sampler)


def sampler_convergence(model, shape, noise: np.ndarray, model_kwargs: dict | None = None, steps=(5, 10, 20),
                        reference_steps: int = 200, samplers=("ddim", "dpm++2m"), cond_free_k: float = 2.0,
                        trained_diffusion_steps: int = 4000, clip_denoised: bool = True, transform=None,
                        progress=False) -> dict:
    """How close each sampler at each step count comes to a ``reference_steps`` DDIM run from the same ``noise``.

    DDIM (eta 0) and DPM-Solver++ integrate the same probability-flow ODE, so both should approach the reference as
    steps grow, DPM-Solver++ faster. The guided noise prediction is made the same: dpm++ with guidance scale
    ``cond_free_k``, ddim (the reference too) with conditioning_free_k = cond_free_k - 1 and no ramp.
    ``transform`` (e.g. the mel denormalisation) applies to every output before comparing.
    Returns {"reference": array, "errors": {sampler: {steps: {"max": ..., "rms": ...}}}}; see format_convergence.
    """
    for sampler in samplers:
        check_sampler(sampler)
        if sampler == "p":
            raise ValueError("sampler 'p' is stochastic: it does not follow the ODE (compare ddim and dpm++)")
    transform = transform or (lambda a: a)
    diffusers = {(s, n): _convergence_diffuser(s, n, cond_free_k, trained_diffusion_steps)
                 for s in ("ddim", *samplers) for n in (*steps, reference_steps)}

    def run(sampler, n):
        return transform(diffusers[sampler, n].sample_loop(model, shape, noise=noise, clip_denoised=clip_denoised,
                                                           model_kwargs=model_kwargs, progress=progress))

    reference = run("ddim", reference_steps)
    errors = {}
    for sampler in samplers:
        errors[sampler] = {}
        for n in steps:
            diff = (run(sampler, n) - reference).astype(np.float64)
            errors[sampler][n] = {"max": float(np.abs(diff).max()), "rms": float(np.sqrt(np.mean(diff ** 2)))}
    return {"reference": reference, "reference_steps": reference_steps, "errors": errors}


def format_convergence(result: dict) -> str:
    """sampler_convergence's errors as a table: one row per sampler, max | rms error per step count."""
    errors = result["errors"]
    steps = sorted({n for per in errors.values() for n in per})
    head = f"{'vs ddim ' + str(result['reference_steps']):<16}" + "".join(f"{f'{n} steps max | rms':>26}"
                                                                        for n in steps)
    rows = [head]
    for sampler, per in errors.items():
        rows.append(f"{sampler:<16}" + "".join(f"{per[n]['max']:>14.4g} | {per[n]['rms']:<9.4g}" if n in per
                                               else " " * 26 for n in steps))
    return "\n".join(rows)


def _call_model(model, x: np.ndarray, ts, model_kwargs: dict | None, conditioning_free: bool):
    """(output, output without conditioning or None) of ``model`` at timestep ``ts`` (one number for the whole
    batch), each (B, 2C, ...): with ``conditioning_free`` one call on a batch of 2B, conditioned then not."""
    model_kwargs = model_kwargs or {}
    b, c = x.shape[:2]
    if conditioning_free:
        # the batch doubles: per-entry conditioning (embeddings, latents) is repeated for the second half,
        # which ignores it
        kwargs = {k: np.concatenate([v, v]) if isinstance(v, np.ndarray) and v.ndim and len(v) == b else v
                  for k, v in model_kwargs.items()}
        both = model(np.concatenate([x, x]), np.full((2 * b,), ts),
                     conditioning_free=np.repeat([False, True], b), **kwargs)
        outputs = both[:b], both[b:]
    else:
        outputs = model(x, np.full((b,), ts), **model_kwargs), None
    if outputs[0].shape != (b, 2 * c, *x.shape[2:]):
        raise ValueError(f"the model gave {outputs[0].shape}, expected {(b, 2 * c, *x.shape[2:])} "
                         "(noise and variance for each channel)")
    return outputs


def _start_noise(shape, noise: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    img = noise if noise is not None else rng.standard_normal(shape, dtype=np.float32)
    if tuple(img.shape) != tuple(shape):
        raise ValueError(f"noise has shape {img.shape}, expected {tuple(shape)}")
    return np.ascontiguousarray(img, dtype=np.float32)


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


__all__ = ["DPM_SAMPLERS", "SAMPLERS", "GaussianDiffusion", "NoiseScheduleVP", "SpacedDiffusion", "check_sampler",
           "format_convergence", "get_named_beta_schedule", "sample_loop", "sampler_convergence", "space_timesteps"]
