"""The samplers of tortoise_ggml/utils/diffusion.py ("p", "ddim", "dpm++2m", "dpm++2m-fast") on a toy model (no
weights, no ggml): each against its reference run here on the same model and the same noise.

  * p, ddim: tortoise-tts 3.0.0's own SpacedDiffusion.p_sample_loop / ddim_sample_loop (both float32; the per-step
    noise the reference draws with torch.randn_like is fed from the numpy stream ours draws from).
  * dpm++2m, dpm++2m-fast: a port, below, of LuChengTHU/dpm-solver's dpm_solver_pytorch.py (commit 52bc3fb, MIT
    licence, Copyright (c) 2022 Cheng Lu): NoiseScheduleVP, model_wrapper (model_type "noise", guidance
    "classifier-free"), DPM_Solver ("dpmsolver++", method "multistep", order 2, skip_type "time_uniform",
    lower_order_final), trimmed to those paths with the code of each kept as it is. Its discrete wrapper gives the
    model (t - 1/N) * 1000; the model here is called through an adapter that rescales that to tortoise's 0..3999
    (x N/1000), as ours does; for "-fast" the adapter multiplies t by 1000, as tortoise-tts-fast's does. Clipping
    (clip_denoised) is dpm-solver's correcting_x0_fn = clamp(-1, 1).

The toy model outputs the exact noise prediction for data x_0 ~ N(mu, 0.15^2) per entry (mu from the "aligned
embeddings" when conditioned, a fixed vector when conditioning-free), knowing tortoise's 4000-step schedule, plus a
nonlinear perturbation (tanh of a fixed random linear map of x, a timestep term and mu), and tanh variance values
in the other half of its channels; it evaluates in float64 and returns the input's dtype, so both sides see the
same function. The "rough" toy scales the perturbation so the x_0 predictions at high noise leave [-1, 1] and the
clipping binds (checked); the smooth one keeps the ODE smooth for the convergence test.

Tolerances (measured on these cases):
  * p, ddim vs tortoise (float32 both, the same float32 step arithmetic): max abs error 1e-7 .. 2e-6 on samples
    of size ~1 (2e-6: no clipping, so x_0 predictions up to ~40) -> ATOL_TORTOISE 1e-5.
  * dpm++2m (time-uniform, logSNR, -fast) vs the port run in float64 (torch default dtype float64): 1e-7 .. 6e-7
    -> ATOL_DPM 1e-5 (ours: float64 schedule and data prediction, float32 samples and model output). One step is
    the exception, 3e-5 -> ATOL_DPM_ONE_STEP 1e-4: its output is the x_0 prediction at t_T itself, where the
    float32 rounding of the model's output is multiplied by sigma_T / alpha_T = 153.
  * Against the port in float32 (dpm-solver's default), its own float32 schedule (sigma_t = sqrt(1 - exp(2 log
    alpha_t)) near t_0, lambda_t) and its float32 x_0 division add 7e-6 .. 1.6e-4 -> ATOL_DPM_F32 5e-4.
"""
import itertools
import math

import numpy as np
import pytest

from tortoise_ggml.utils import diffusion as D

torch = pytest.importorskip("torch")

ATOL_TORTOISE = 1e-5
ATOL_DPM = 1e-5
ATOL_DPM_ONE_STEP = 1e-4
ATOL_DPM_F32 = 5e-4
N_TRAINED = 4000
CHANNELS, LENGTH = 6, 16
BETAS = D.get_named_beta_schedule("linear", N_TRAINED)
LOG_ALPHAS_CUMPROD = np.cumsum(np.log1p(-BETAS))


@pytest.fixture(scope="module")
def TD():
    """tortoise.utils.diffusion (tortoise-tts 3.0.0), imported with the torchaudio stand-in in place."""
    from reference import shim
    shim.install()
    from tortoise.utils import diffusion
    return diffusion


# ------------------------------------------------------------------------------------------------------------------
# the toy model
# ------------------------------------------------------------------------------------------------------------------
class ToyModel:
    """DiffusionTts's call signature on a closed-form function (see the module docstring); counts its calls."""

    def __init__(self, seed: int = 0, perturbation: str | None = "smooth", channels: int = CHANNELS,
                 s: float = 0.15, mu_cond: float = 0.2, mu_uncond: float = 0.1):
        rng = np.random.default_rng(seed)
        self.w = rng.standard_normal((channels, channels)) / math.sqrt(channels)
        self.v = rng.standard_normal((channels, channels)) / math.sqrt(channels)
        self.time_vec = rng.standard_normal(channels)
        self.uncond_mu = mu_uncond * rng.standard_normal(channels)
        self.perturbation, self.s, self.mu_cond = perturbation, s, mu_cond
        self.calls = 0

    def cond_mu(self, emb):
        return self.mu_cond * np.tanh(np.asarray(emb, dtype=np.float64))

    def __call__(self, x, timesteps, precomputed_aligned_embeddings=None, conditioning_free=False):
        self.calls += 1
        x = np.asarray(x)
        b = x.shape[0]
        xf = x.astype(np.float64)
        ts = np.broadcast_to(np.asarray(timesteps, dtype=np.float64), (b,))[:, None, None]
        free = np.broadcast_to(np.asarray(conditioning_free, dtype=bool), (b,))[:, None, None]
        cond_mu = (self.cond_mu(precomputed_aligned_embeddings) if precomputed_aligned_embeddings is not None
                   else np.zeros_like(xf))
        assert cond_mu.shape == x.shape, "the embeddings must come batched like x"
        mu = np.where(free, self.uncond_mu[None, :, None], cond_mu)
        log_abar = np.interp(ts, np.arange(N_TRAINED), LOG_ALPHAS_CUMPROD)
        alpha, var = np.exp(0.5 * log_abar), -np.expm1(log_abar)
        eps = np.sqrt(var) * (xf - alpha * mu) / (alpha ** 2 * self.s ** 2 + var)
        if self.perturbation:
            perturbation = np.tanh(np.einsum("oc,bcl->bol", self.w, xf) + self.time_vec[None, :, None]
                                   * np.cos(3 * ts / N_TRAINED) + mu)
            eps = eps + (0.3 if self.perturbation == "rough" else 0.1 * alpha) * perturbation
        var_values = np.tanh(np.einsum("oc,bcl->bol", self.v, xf) + 0.5 * np.sin(ts / 1000))
        return np.concatenate([eps, var_values], axis=1).astype(x.dtype)


class TorchToy(torch.nn.Module):
    """The same function for the torch reference (which asks the model for its parameters' device)."""

    def __init__(self, toy: ToyModel):
        super().__init__()
        self.toy = toy
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, timesteps, precomputed_aligned_embeddings=None, conditioning_free=False):
        emb = precomputed_aligned_embeddings
        if emb is not None and emb.shape[0] != x.shape[0]:   # dpm-solver's batch-of-2 for guidance
            emb = torch.cat([emb] * (x.shape[0] // emb.shape[0]))
        if isinstance(conditioning_free, torch.Tensor):
            conditioning_free = conditioning_free.numpy()
        out = self.toy(x.numpy(), timesteps.numpy(), None if emb is None else emb.to(x.dtype).numpy(),
                       conditioning_free)
        return torch.from_numpy(out)


def T(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def inputs(batch: int, seed: int = 1, length: int = LENGTH):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((batch, CHANNELS, length)).astype(np.float32)
    emb = rng.standard_normal((batch, CHANNELS, length)).astype(np.float32)
    return noise, emb


def diffuser(steps: int, sampler: str = "p", cond_free: bool = True, k: float = 2.0, ramp: bool = True):
    """What api.load_discrete_vocoder_diffuser builds (plus the sampler)."""
    return D.SpacedDiffusion(use_timesteps=D.space_timesteps(N_TRAINED, [steps]), model_mean_type="epsilon",
                             model_var_type="learned_range", loss_type="mse", betas=BETAS,
                             conditioning_free=cond_free, conditioning_free_k=k, ramp_conditioning_free=ramp,
                             sampler=sampler)


def reference_diffuser(TD, steps: int, cond_free: bool = True, k: float = 2.0):
    """tortoise/api.py's load_discrete_vocoder_diffuser."""
    return TD.SpacedDiffusion(use_timesteps=TD.space_timesteps(N_TRAINED, [steps]), model_mean_type="epsilon",
                              model_var_type="learned_range", loss_type="mse",
                              betas=TD.get_named_beta_schedule("linear", N_TRAINED), conditioning_free=cond_free,
                              conditioning_free_k=k)


def feed_torch_noise(monkeypatch, rng: np.random.Generator):
    """torch.randn_like draws from ``rng`` (the draws our loops make, in their order)."""
    monkeypatch.setattr(torch, "randn_like",
                        lambda x, **kw: torch.from_numpy(rng.standard_normal(tuple(x.shape), dtype=np.float32)))


# ------------------------------------------------------------------------------------------------------------------
# dpm-solver's torch reference (dpm_solver_pytorch.py, trimmed to the paths used; see the module docstring)
# ------------------------------------------------------------------------------------------------------------------
class RefNoiseScheduleVP:
    def __init__(self, schedule='discrete', betas=None, continuous_beta_0=0.1, continuous_beta_1=20.,
                 dtype=torch.float32):
        self.schedule = schedule
        if schedule == 'discrete':
            log_alphas = 0.5 * torch.log(1 - betas).cumsum(dim=0)
            self.T = 1.
            self.log_alpha_array = self.numerical_clip_alpha(log_alphas).reshape((1, -1,)).to(dtype=dtype)
            self.total_N = self.log_alpha_array.shape[1]
            self.t_array = torch.linspace(0., 1., self.total_N + 1)[1:].reshape((1, -1)).to(dtype=dtype)
        else:
            self.T = 1.
            self.total_N = 1000
            self.beta_0 = continuous_beta_0
            self.beta_1 = continuous_beta_1

    def numerical_clip_alpha(self, log_alphas, clipped_lambda=-5.1):
        log_sigmas = 0.5 * torch.log(1. - torch.exp(2. * log_alphas))
        lambs = log_alphas - log_sigmas
        idx = torch.searchsorted(torch.flip(lambs, [0]), clipped_lambda)
        if idx > 0:
            log_alphas = log_alphas[:-idx]
        return log_alphas

    def marginal_log_mean_coeff(self, t):
        if self.schedule == 'discrete':
            return interpolate_fn(t.reshape((-1, 1)), self.t_array.to(t.device),
                                  self.log_alpha_array.to(t.device)).reshape(-1)
        elif self.schedule == 'linear':
            return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def marginal_alpha(self, t):
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        return torch.sqrt(1. - torch.exp(2. * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * torch.log(1. - torch.exp(2. * log_mean_coeff))
        return log_mean_coeff - log_std

    def inverse_lambda(self, lamb):
        if self.schedule == 'linear':
            tmp = 2. * (self.beta_1 - self.beta_0) * torch.logaddexp(-2. * lamb, torch.zeros((1,)).to(lamb))
            Delta = self.beta_0**2 + tmp
            return tmp / (torch.sqrt(Delta) + self.beta_0) / (self.beta_1 - self.beta_0)
        elif self.schedule == 'discrete':
            log_alpha = -0.5 * torch.logaddexp(torch.zeros((1,)).to(lamb.device), -2. * lamb)
            t = interpolate_fn(log_alpha.reshape((-1, 1)), torch.flip(self.log_alpha_array.to(lamb.device), [1]),
                               torch.flip(self.t_array.to(lamb.device), [1]))
            return t.reshape((-1,))


def ref_model_wrapper(model, noise_schedule, model_type="noise", model_kwargs={}, guidance_type="uncond",  # noqa: B006
                      condition=None, unconditional_condition=None, guidance_scale=1.):
    def get_model_input_time(t_continuous):
        if noise_schedule.schedule == 'discrete':
            return (t_continuous - 1. / noise_schedule.total_N) * 1000.
        else:
            return t_continuous

    def noise_pred_fn(x, t_continuous, cond=None):
        t_input = get_model_input_time(t_continuous)
        if cond is None:
            output = model(x, t_input, **model_kwargs)
        else:
            output = model(x, t_input, cond, **model_kwargs)
        assert model_type == "noise"
        return output

    def model_fn(x, t_continuous):
        assert guidance_type == "classifier-free"
        if guidance_scale == 1. or unconditional_condition is None:
            return noise_pred_fn(x, t_continuous, cond=condition)
        else:
            x_in = torch.cat([x] * 2)
            t_in = torch.cat([t_continuous] * 2)
            c_in = torch.cat([unconditional_condition, condition])
            noise_uncond, noise = noise_pred_fn(x_in, t_in, cond=c_in).chunk(2)
            return noise_uncond + guidance_scale * (noise - noise_uncond)

    return model_fn


class RefDPMSolver:
    def __init__(self, model_fn, noise_schedule, algorithm_type="dpmsolver++", correcting_x0_fn=None):
        self.model = lambda x, t: model_fn(x, t.expand(x.shape[0]))
        self.noise_schedule = noise_schedule
        assert algorithm_type == "dpmsolver++"
        self.algorithm_type = algorithm_type
        self.correcting_x0_fn = correcting_x0_fn

    def noise_prediction_fn(self, x, t):
        return self.model(x, t)

    def data_prediction_fn(self, x, t):
        noise = self.noise_prediction_fn(x, t)
        alpha_t, sigma_t = self.noise_schedule.marginal_alpha(t), self.noise_schedule.marginal_std(t)
        x0 = (x - sigma_t * noise) / alpha_t
        if self.correcting_x0_fn is not None:
            x0 = self.correcting_x0_fn(x0, t)
        return x0

    def model_fn(self, x, t):
        return self.data_prediction_fn(x, t)

    def get_time_steps(self, skip_type, t_T, t_0, N, device):
        if skip_type == 'logSNR':
            lambda_T = self.noise_schedule.marginal_lambda(torch.tensor(t_T).to(device))
            lambda_0 = self.noise_schedule.marginal_lambda(torch.tensor(t_0).to(device))
            logSNR_steps = torch.linspace(lambda_T.cpu().item(), lambda_0.cpu().item(), N + 1).to(device)
            return self.noise_schedule.inverse_lambda(logSNR_steps)
        assert skip_type == 'time_uniform'
        return torch.linspace(t_T, t_0, N + 1).to(device)

    def dpm_solver_first_update(self, x, s, t, model_s=None):
        ns = self.noise_schedule
        lambda_s, lambda_t = ns.marginal_lambda(s), ns.marginal_lambda(t)
        h = lambda_t - lambda_s
        log_alpha_t = ns.marginal_log_mean_coeff(t)
        sigma_s, sigma_t = ns.marginal_std(s), ns.marginal_std(t)
        alpha_t = torch.exp(log_alpha_t)
        phi_1 = torch.expm1(-h)
        if model_s is None:
            model_s = self.model_fn(x, s)
        x_t = (
            sigma_t / sigma_s * x
            - alpha_t * phi_1 * model_s
        )
        return x_t

    def multistep_dpm_solver_second_update(self, x, model_prev_list, t_prev_list, t, solver_type="dpmsolver"):
        ns = self.noise_schedule
        model_prev_1, model_prev_0 = model_prev_list[-2], model_prev_list[-1]
        t_prev_1, t_prev_0 = t_prev_list[-2], t_prev_list[-1]
        lambda_prev_1, lambda_prev_0, lambda_t = (ns.marginal_lambda(t_prev_1), ns.marginal_lambda(t_prev_0),
                                                  ns.marginal_lambda(t))
        sigma_prev_0, sigma_t = ns.marginal_std(t_prev_0), ns.marginal_std(t)
        log_alpha_t = ns.marginal_log_mean_coeff(t)
        alpha_t = torch.exp(log_alpha_t)

        h_0 = lambda_prev_0 - lambda_prev_1
        h = lambda_t - lambda_prev_0
        r0 = h_0 / h
        D1_0 = (1. / r0) * (model_prev_0 - model_prev_1)
        phi_1 = torch.expm1(-h)
        assert solver_type == 'dpmsolver'
        x_t = (
            (sigma_t / sigma_prev_0) * x
            - (alpha_t * phi_1) * model_prev_0
            - 0.5 * (alpha_t * phi_1) * D1_0
        )
        return x_t

    def multistep_dpm_solver_update(self, x, model_prev_list, t_prev_list, t, order, solver_type='dpmsolver'):
        if order == 1:
            return self.dpm_solver_first_update(x, t_prev_list[-1], t, model_s=model_prev_list[-1])
        elif order == 2:
            return self.multistep_dpm_solver_second_update(x, model_prev_list, t_prev_list, t,
                                                           solver_type=solver_type)
        raise ValueError(order)

    def sample(self, x, steps=20, t_start=None, t_end=None, order=2, skip_type='time_uniform', method='multistep',
               lower_order_final=True, solver_type='dpmsolver'):
        t_0 = 1. / self.noise_schedule.total_N if t_end is None else t_end
        t_T = self.noise_schedule.T if t_start is None else t_start
        device = x.device
        assert method == 'multistep'
        with torch.no_grad():
            assert steps >= order
            timesteps = self.get_time_steps(skip_type=skip_type, t_T=t_T, t_0=t_0, N=steps, device=device)
            assert timesteps.shape[0] - 1 == steps
            step = 0
            t = timesteps[step]
            t_prev_list = [t]
            model_prev_list = [self.model_fn(x, t)]
            for step in range(1, order):
                t = timesteps[step]
                x = self.multistep_dpm_solver_update(x, model_prev_list, t_prev_list, t, step,
                                                     solver_type=solver_type)
                t_prev_list.append(t)
                model_prev_list.append(self.model_fn(x, t))
            for step in range(order, steps + 1):
                t = timesteps[step]
                if lower_order_final and steps < 10:
                    step_order = min(order, steps + 1 - step)
                else:
                    step_order = order
                x = self.multistep_dpm_solver_update(x, model_prev_list, t_prev_list, t, step_order,
                                                     solver_type=solver_type)
                for i in range(order - 1):
                    t_prev_list[i] = t_prev_list[i + 1]
                    model_prev_list[i] = model_prev_list[i + 1]
                t_prev_list[-1] = t
                if step < steps:
                    model_prev_list[-1] = self.model_fn(x, t)
        return x


def interpolate_fn(x, xp, yp):
    N, K = x.shape[0], xp.shape[1]
    all_x = torch.cat([x.unsqueeze(2), xp.unsqueeze(0).repeat((N, 1, 1))], dim=2)
    sorted_all_x, x_indices = torch.sort(all_x, dim=2)
    x_idx = torch.argmin(x_indices, dim=2)
    cand_start_idx = x_idx - 1
    start_idx = torch.where(
        torch.eq(x_idx, 0),
        torch.tensor(1, device=x.device),
        torch.where(
            torch.eq(x_idx, K), torch.tensor(K - 2, device=x.device), cand_start_idx,
        ),
    )
    end_idx = torch.where(torch.eq(start_idx, cand_start_idx), start_idx + 2, start_idx + 1)
    start_x = torch.gather(sorted_all_x, dim=2, index=start_idx.unsqueeze(2)).squeeze(2)
    end_x = torch.gather(sorted_all_x, dim=2, index=end_idx.unsqueeze(2)).squeeze(2)
    start_idx2 = torch.where(
        torch.eq(x_idx, 0),
        torch.tensor(0, device=x.device),
        torch.where(
            torch.eq(x_idx, K), torch.tensor(K - 2, device=x.device), cand_start_idx,
        ),
    )
    y_positions_expanded = yp.unsqueeze(0).expand(N, -1, -1)
    start_y = torch.gather(y_positions_expanded, dim=2, index=start_idx2.unsqueeze(2)).squeeze(2)
    end_y = torch.gather(y_positions_expanded, dim=2, index=(start_idx2 + 1).unsqueeze(2)).squeeze(2)
    cand = start_y + (x - start_x) * (end_y - start_y) / (end_x - start_x)
    return cand


def reference_dpm(toy, noise, emb, steps, k, clip, fast=False, dtype=torch.float64, skip_type="time_uniform"):
    """dpm++2m as the port computes it (in ``dtype``), with the toy behind the adapter described above."""
    old_default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if fast:
            ns = RefNoiseScheduleVP('linear', continuous_beta_0=0.1 / 4, continuous_beta_1=20.0 / 4, dtype=dtype)
            time_scale = 1000.0
        else:
            ns = RefNoiseScheduleVP('discrete', betas=torch.tensor(BETAS), dtype=dtype)
            time_scale = N_TRAINED / 1000
        net = TorchToy(toy)
        b = noise.shape[0]

        def model(x, t_input, cond, precomputed_aligned_embeddings):
            return net(x, t_input * time_scale, precomputed_aligned_embeddings, cond)[:, :CHANNELS]

        model_fn = ref_model_wrapper(model, ns, model_type="noise",
                                     model_kwargs={"precomputed_aligned_embeddings": T(emb).to(dtype)},
                                     guidance_type="classifier-free", condition=torch.zeros(b, dtype=torch.bool),
                                     unconditional_condition=torch.ones(b, dtype=torch.bool), guidance_scale=k)
        solver = RefDPMSolver(model_fn, ns, "dpmsolver++",
                              correcting_x0_fn=(lambda x0, t: x0.clamp(-1, 1)) if clip else None)
        return solver.sample(T(noise).to(dtype), steps=steps, order=min(2, steps), skip_type=skip_type,
                             method="multistep", lower_order_final=True).numpy()
    finally:
        torch.set_default_dtype(old_default)


# ------------------------------------------------------------------------------------------------------------------
# p and ddim against tortoise
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps,cond_free,batch,clip", [(7, True, 1, True), (12, False, 2, True),
                                                        (5, True, 1, False)])
def test_ddim_matches_tortoise(TD, steps, cond_free, batch, clip):
    toy = ToyModel(perturbation="rough")
    noise, emb = inputs(batch)
    ours = diffuser(steps, "ddim", cond_free).sample_loop(toy, noise.shape, noise=noise, clip_denoised=clip,
                                                          model_kwargs={"precomputed_aligned_embeddings": emb})
    with torch.no_grad():
        ref = reference_diffuser(TD, steps, cond_free).ddim_sample_loop(
            TorchToy(toy), noise.shape, noise=T(noise), clip_denoised=clip,
            model_kwargs={"precomputed_aligned_embeddings": T(emb)}).numpy()
    assert ours.dtype == np.float32 and ours.shape == noise.shape
    assert np.abs(ref).max() > 0.1 and np.abs(ref - noise).max() > 0.1
    print(f"ddim {steps} steps: max abs error vs tortoise {np.abs(ours - ref).max():.3g}")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL_TORTOISE)
    # the sampler is deterministic and is not p
    np.testing.assert_array_equal(diffuser(steps, "ddim", cond_free).sample_loop(
        toy, noise.shape, noise=noise, clip_denoised=clip, model_kwargs={"precomputed_aligned_embeddings": emb},
        rng=123), ours)
    p = diffuser(steps, "p", cond_free).sample_loop(toy, noise.shape, noise=noise, clip_denoised=clip, rng=0,
                                                    model_kwargs={"precomputed_aligned_embeddings": emb})
    assert np.abs(p - ours).max() > 0.01


def test_ddim_clipping_binds():
    """The rough toy's clipping changes the result (so the cases above test it)."""
    toy = ToyModel(perturbation="rough")
    noise, emb = inputs(1)
    kw = {"model_kwargs": {"precomputed_aligned_embeddings": emb}, "noise": noise}
    clipped = diffuser(7, "ddim").sample_loop(toy, noise.shape, clip_denoised=True, **kw)
    free = diffuser(7, "ddim").sample_loop(toy, noise.shape, clip_denoised=False, **kw)
    assert np.abs(clipped - free).max() > 0.01


@pytest.mark.parametrize("sampler", ["p", "ddim"])
def test_stochastic_steps_match_tortoise(TD, monkeypatch, sampler):
    """p, and ddim with eta > 0: the per-step noise of the reference is ours."""
    toy = ToyModel(perturbation="rough")
    noise, emb = inputs(1)
    steps, eta_kw = 6, ({"eta": 0.5} if sampler == "ddim" else {})
    ours_d = diffuser(steps, sampler)
    loop = ours_d.ddim_sample_loop if sampler == "ddim" else ours_d.p_sample_loop
    ours = loop(toy, noise.shape, noise=noise, model_kwargs={"precomputed_aligned_embeddings": emb}, rng=5, **eta_kw)
    feed_torch_noise(monkeypatch, np.random.default_rng(5))
    ref_d = reference_diffuser(TD, steps)
    ref_loop = ref_d.ddim_sample_loop if sampler == "ddim" else ref_d.p_sample_loop
    with torch.no_grad():
        ref = ref_loop(TorchToy(toy), noise.shape, noise=T(noise),
                       model_kwargs={"precomputed_aligned_embeddings": T(emb)}, **eta_kw).numpy()
    monkeypatch.undo()
    print(f"{sampler} (stochastic): max abs error vs tortoise {np.abs(ours - ref).max():.3g}")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL_TORTOISE)
    if sampler == "ddim":   # eta matters
        assert np.abs(ours - diffuser(steps, "ddim").sample_loop(toy, noise.shape, noise=noise, model_kwargs={
            "precomputed_aligned_embeddings": emb})).max() > 0.01


# ------------------------------------------------------------------------------------------------------------------
# dpm++2m against dpm-solver
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,steps,k,clip,batch", [("dpm++2m", 12, 2.0, True, 1), ("dpm++2m", 4, 2.0, True, 2),
                                                        ("dpm++2m", 1, 2.0, True, 1), ("dpm++2m", 10, 1.0, True, 1),
                                                        ("dpm++2m", 8, 3.0, False, 1),
                                                        ("dpm++2m-logsnr", 12, 2.0, True, 1),
                                                        ("dpm++2m-logsnr", 6, 2.0, False, 1)])
def test_dpmpp_2m_matches_dpm_solver(sampler, steps, k, clip, batch):
    toy = ToyModel(perturbation="rough")
    noise, emb = inputs(batch)
    d = diffuser(steps, sampler, k=k)
    skip_type = "logSNR" if sampler == "dpm++2m-logsnr" else "time_uniform"
    calls = toy.calls
    ours = d.sample_loop(toy, noise.shape, noise=noise, clip_denoised=clip,
                         model_kwargs={"precomputed_aligned_embeddings": emb})
    assert toy.calls - calls == steps                    # one (batch-of-2) call per step
    ref64 = reference_dpm(toy, noise, emb, steps, k, clip, skip_type=skip_type)
    ref32 = reference_dpm(toy, noise, emb, steps, k, clip, dtype=torch.float32, skip_type=skip_type)
    assert ours.dtype == np.float32 and ours.shape == noise.shape
    assert np.abs(ref64).max() > 0.1 and np.abs(ref64 - noise).max() > 0.1
    print(f"{sampler} {steps} steps: max abs error vs the float64 port {np.abs(ours - ref64).max():.3g}, "
          f"vs float32 {np.abs(ours - ref32).max():.3g}")
    np.testing.assert_allclose(ours, ref64, rtol=0, atol=ATOL_DPM if steps > 1 else ATOL_DPM_ONE_STEP)
    np.testing.assert_allclose(ours, ref32, rtol=0, atol=ATOL_DPM_F32)
    if clip:   # clipping binds here, so the comparison covers it
        free = d.sample_loop(toy, noise.shape, noise=noise, clip_denoised=False,
                             model_kwargs={"precomputed_aligned_embeddings": emb})
        assert np.abs(free - ours).max() > 0.01


def test_dpmpp_2m_fast_matches_dpm_solver():
    """tortoise-tts-fast's variant: continuous linear schedule 0.025..5, model time t * 1000, no clipping."""
    toy = ToyModel(perturbation="rough")
    noise, emb = inputs(1)
    kw = {"noise": noise, "model_kwargs": {"precomputed_aligned_embeddings": emb}}
    ours = diffuser(10, "dpm++2m-fast").sample_loop(toy, noise.shape, **kw)
    ref = reference_dpm(toy, noise, emb, 10, 2.0, clip=False, fast=True)
    print(f"dpm++2m-fast: max abs error vs the float64 port {np.abs(ours - ref).max():.3g}")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL_DPM)
    # clip_denoised does not apply to it (tortoise-tts-fast ignores it), and it is not dpm++2m
    np.testing.assert_array_equal(diffuser(10, "dpm++2m-fast").sample_loop(toy, noise.shape, clip_denoised=False,
                                                                            **kw), ours)
    assert np.abs(diffuser(10, "dpm++2m").sample_loop(toy, noise.shape, **kw) - ours).max() > 0.01


def test_noise_schedule_matches_dpm_solver():
    ns = D.NoiseScheduleVP("discrete", betas=BETAS)
    torch.set_default_dtype(torch.float64)
    try:
        ref = RefNoiseScheduleVP("discrete", betas=torch.tensor(BETAS), dtype=torch.float64)
        t = torch.cat([torch.linspace(1.0, 1.0 / N_TRAINED, 37), torch.tensor([0.3337, 0.5, 1.0 / N_TRAINED])])
        for name in ("marginal_log_mean_coeff", "marginal_alpha", "marginal_std", "marginal_lambda"):
            np.testing.assert_allclose(getattr(ns, name)(t.numpy()), getattr(ref, name)(t).numpy(), rtol=1e-9,
                                       err_msg=name)
    finally:
        torch.set_default_dtype(torch.float32)
    assert ns.total_N == N_TRAINED                         # tortoise's schedule ends at lambda -5.03: none clipped
    # the grid ends at the model's timesteps N-1 and 0; on the grid points alpha_t is the table's
    np.testing.assert_allclose(ns.model_time([1.0, 1.0 / N_TRAINED]), [N_TRAINED - 1, 0], atol=1e-9)
    np.testing.assert_allclose(ns.marginal_alpha((np.arange(N_TRAINED) + 1) / N_TRAINED) ** 2,
                               np.exp(LOG_ALPHAS_CUMPROD), rtol=1e-9)
    d = diffuser(30, "dpm++2m")
    np.testing.assert_array_equal(d.original_betas, BETAS)  # dpm++ uses the whole schedule, not the spaced one
    assert d.num_timesteps == 30 and len(d.betas) == 30


# ------------------------------------------------------------------------------------------------------------------
# DDIM and DPM-Solver++ solve the same ODE
# ------------------------------------------------------------------------------------------------------------------
def test_ddim_and_dpmpp_converge_to_the_same_ode():
    """Against a many-step DDIM of the same noise (the guidance made equal: ddim k - 1 without the ramp vs dpm++
    k), on the smooth toy. The reference takes 2000 steps: a 200-step DDIM (the benchmark's default) is itself ~0.02
    off here, as far as 200 dpm++2m steps. Measured (max abs error, samples within +-0.75; seeds 0, 3, 7, 11 alike):

        steps             5      10      20     200
        ddim           0.38    0.27    0.17   0.018
        dpm++2m        0.35    0.11    0.15   0.021
        dpm++2m-logsnr 0.13   0.022   0.010  0.0026
        dpm++2m-fast   0.48    0.12    0.19    0.30   (another ODE)

    dpm++2m with time-uniform steps (tortoise-tts-fast's choice) is not monotone at 10 -> 20 and no better than ddim
    at 200: on tortoise's schedule its last steps are long in lambda (of 20 steps: lambda 1.7 .. 5.3, extrapolated
    ~5x the previous step); see test_convergence_orders_on_a_known_ode."""
    toy = ToyModel(seed=3)
    noise, emb = inputs(1, seed=4, length=32)
    result = D.sampler_convergence(toy, noise.shape, noise, {"precomputed_aligned_embeddings": emb},
                                   steps=(5, 10, 20, 200), reference_steps=2000, cond_free_k=2.0,
                                   samplers=("ddim", "dpm++2m", "dpm++2m-logsnr", "dpm++2m-fast"))
    print("\n" + D.format_convergence(result))
    err = {s: [result["errors"][s][n]["max"] for n in (5, 10, 20, 200)] for s in result["errors"]}
    assert np.abs(result["reference"]).max() < 0.9      # clipping does not bind at the end
    assert err["ddim"][0] > err["ddim"][1] > err["ddim"][2] > err["ddim"][3]
    assert err["dpm++2m-logsnr"][0] > err["dpm++2m-logsnr"][1] > err["dpm++2m-logsnr"][2]
    assert err["dpm++2m"][1] < err["ddim"][1]           # 10 dpm++ steps land closer than 10 ddim steps
    assert err["dpm++2m-logsnr"][1] < 0.25 * err["ddim"][1]
    assert err["dpm++2m"][0] > err["dpm++2m"][1] > err["dpm++2m"][3] and err["dpm++2m"][3] < 0.04   # the same ODE
    # tortoise-tts-fast's continuous schedule is another ODE: at 200 steps it is still far off
    assert err["dpm++2m-fast"][3] > 3 * err["dpm++2m"][3]
    assert "dpm++2m-logsnr" in D.format_convergence(result)


def test_convergence_orders_on_a_known_ode():
    """The Gaussian toy (no perturbation) has a closed-form probability-flow ODE: x_0 ~ N(mu, s^2) gives
    x_t = alpha_t mu + sqrt(alpha_t^2 s^2 + sigma_t^2) z with z fixed by the start noise. No clipping, k = 1.
    ddim (which ends with the x_0 prediction at timestep 0) converges at first order, dpm++2m-logsnr at second;
    time-uniform dpm++2m reaches second order only past ~100 steps. Measured max errors (s = 0.15):
        steps            10      20      40      80     160     320
        ddim           0.27    0.17   0.091   0.048   0.025   0.013
        dpm++2m       0.014    0.13    0.13   0.072   0.026  0.0078
        dpm++2m-logsnr 0.013  0.0065  0.0018 0.00046
    """
    toy = ToyModel(seed=3, perturbation=None, mu_cond=0.3, mu_uncond=0.2)
    noise, emb = inputs(1, seed=4, length=32)
    mu, s = toy.cond_mu(emb), toy.s
    alpha_0, alpha_1 = np.exp(0.5 * LOG_ALPHAS_CUMPROD[[0, -1]])
    var_0, var_1 = -np.expm1(LOG_ALPHAS_CUMPROD[[0, -1]])
    z = (noise - alpha_1 * mu) / np.sqrt(alpha_1 ** 2 * s ** 2 + var_1)
    exact_t0 = alpha_0 * mu + np.sqrt(alpha_0 ** 2 * s ** 2 + var_0) * z
    exact_x0 = mu + alpha_0 * s ** 2 / (alpha_0 ** 2 * s ** 2 + var_0) * (exact_t0 - alpha_0 * mu)
    kw = {"noise": noise, "model_kwargs": {"precomputed_aligned_embeddings": emb}, "clip_denoised": False}

    def err(sampler, n):
        d = diffuser(n, sampler, cond_free=sampler != "ddim", k=1.0)
        return float(np.abs(d.sample_loop(toy, noise.shape, **kw) - (exact_x0 if sampler == "ddim" else exact_t0)
                            ).max())

    ddim = [err("ddim", n) for n in (20, 40, 80)]
    logsnr = [err("dpm++2m-logsnr", n) for n in (10, 20, 40, 80)]
    uniform = [err("dpm++2m", n) for n in (80, 160, 320)]
    for e in (ddim, logsnr, uniform):
        assert all(a > b for a, b in itertools.pairwise(e)), e
    assert all(0.4 < b / a < 0.6 for a, b in itertools.pairwise(ddim)), ddim           # first order
    assert all(b / a < 0.35 for a, b in itertools.pairwise(logsnr[1:])), logsnr      # second order
    assert all(b / a < 0.4 for a, b in itertools.pairwise(uniform)), uniform
    assert logsnr[1] < 0.1 * ddim[0]                                             # 20 steps each


# ------------------------------------------------------------------------------------------------------------------
# the dispatcher, progress, bad input
# ------------------------------------------------------------------------------------------------------------------
def test_sampler_names_and_dispatch():
    assert D.SAMPLERS[:3] == ("p", "ddim", "dpm++2m")
    assert diffuser(3).sampler == "p"                       # tortoise's default
    toy = ToyModel(perturbation="rough")
    noise, emb = inputs(1)
    kw = {"noise": noise, "model_kwargs": {"precomputed_aligned_embeddings": emb}, "rng": 9}
    for sampler in D.SAMPLERS:
        own = diffuser(6, sampler).sample_loop(toy, noise.shape, **kw)
        np.testing.assert_array_equal(D.sample_loop(diffuser(6), sampler, toy, noise.shape, **kw), own)
        np.testing.assert_array_equal(diffuser(6).sample_loop(toy, noise.shape, sampler=sampler, **kw), own)
    np.testing.assert_array_equal(diffuser(6).sample_loop(toy, noise.shape, **kw),
                                  diffuser(6).p_sample_loop(toy, noise.shape, **kw))


@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_progress_is_called_once_per_model_call(sampler):
    toy = ToyModel()
    noise, emb = inputs(1)
    seen = []
    diffuser(5, sampler).sample_loop(toy, noise.shape, noise=noise, progress=lambda i, n: seen.append((i, n)),
                                     model_kwargs={"precomputed_aligned_embeddings": emb})
    assert seen == [(i, 5) for i in range(5)] and toy.calls == 5


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not be called")


def test_bad_input_raises_before_any_work():
    noise, _ = inputs(1)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        diffuser(5, "euler")
    with pytest.raises(ValueError, match="unknown sampler"):
        diffuser(5).sample_loop(_no_model, noise.shape, noise=noise, sampler="dpm++3m")
    with pytest.raises(ValueError, match="unknown sampler"):
        D.sample_loop(diffuser(5), 42, _no_model, noise.shape, noise=noise)
    with pytest.raises(ValueError, match=r"dpm\+\+2m.*cond_free"):
        diffuser(5, "dpm++2m", cond_free=False)
    with pytest.raises(ValueError, match="cond_free"):
        D.sample_loop(diffuser(5, cond_free=False), "dpm++2m", _no_model, noise.shape, noise=noise)
    with pytest.raises(ValueError, match="cond_free"):
        diffuser(5, cond_free=False).dpm_solver_sample_loop(_no_model, noise.shape, noise=noise)
    for steps in (0, -3):
        with pytest.raises(ValueError, match="at least 1"):
            diffuser(steps, "dpm++2m")
    with pytest.raises(ValueError, match="at least 1"):
        D.SpacedDiffusion(use_timesteps=set(), betas=BETAS)
    with pytest.raises(ValueError, match=r"lie in \[0, 4000\)"):
        D.SpacedDiffusion(use_timesteps={0, 4000}, betas=BETAS)
    with pytest.raises(ValueError, match="cannot divide section of 4000 steps into 4001 .at most 4000"):
        diffuser(4001, "ddim")
    with pytest.raises(ValueError, match="noise has shape"):
        diffuser(5, "dpm++2m").sample_loop(_no_model, (1, CHANNELS, 7), noise=noise)
    with pytest.raises(ValueError, match="eta"):
        diffuser(5, "ddim").ddim_sample_loop(_no_model, noise.shape, noise=noise, eta=-1)
    with pytest.raises(ValueError, match="eta > 0 needs the step's noise"):
        diffuser(5, "ddim").ddim_sample(_no_model, noise, 3, eta=0.5)
    with pytest.raises(ValueError, match="sampler 'p' is stochastic"):
        D.sampler_convergence(_no_model, noise.shape, noise, samplers=("p",))
    with pytest.raises(ValueError, match="expected"):        # a model without the variance channels
        diffuser(5, "dpm++2m").sample_loop(lambda x, t, **kw: x, noise.shape, noise=noise)
