"""Gaussian diffusion as used by DiT (ADM / improved-DDPM code, facebookresearch/DiT `diffusion/`).

Epsilon prediction, learned-range variance (or fixed-large without learn_sigma), loss = MSE + VB.
Schedules are computed in numpy float64 like the original and cast to float32 on use. Everything
that takes arrays is pure jnp and jittable; layout is NHWC, so the model output is split on axis -1.

Respacing follows respace.py: a respaced process keeps a subset of the original timesteps, and the
model always receives ORIGINAL-scale timesteps (`timestep_map[t]`), like its _WrappedModel.

Samplers: ancestral DDPM (p_sample_loop), DDIM (ddim_sample_loop) and DPM-Solver++(2M)
(dpm_solver_sample_loop, deterministic, data prediction, diffusers' DPMSolverMultistepScheduler
conventions); `create_diffusion` picks one from the spacing string ("250" -> ddpm, "ddim50" -> ddim,
"dpm++25" -> dpm++2m) and `sample_loop` runs the one the process was made for.

Randomness in the samplers: `keys` holds one PRNG key per sample. Sample i draws its initial noise
from split(keys[i])[0] and the noise of respaced step t from fold_in(split(keys[i])[1], t), so a sample
does not depend on the batch it is drawn in, its position there, or the device count.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# --------------------------------------------------------------------------------------------
# Schedules and respacing (numpy, float64)
# --------------------------------------------------------------------------------------------


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    if name == "linear":
        # Scaled so that any step count spans the same range as the 1000-step original.
        scale = 1000 / num_steps
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - f((i + 1) / num_steps) / f(i / num_steps), 0.999)
                         for i in range(num_steps)], dtype=np.float64)
    raise ValueError(f"unknown noise_schedule {name!r}; choose 'linear' or 'squaredcos_cap_v2'")


def dpm_solver_timesteps(num_steps: int, n: int) -> np.ndarray:
    """The N timesteps, descending, of diffusers' DPMSolverMultistepScheduler.set_timesteps(N) with
    its default timestep_spacing="linspace" (and lambda_min_clipped=-inf): linspace(0, T-1, N+1)
    rounded, reversed, the final 0 dropped; e.g. T=1000, N=25 -> 999, 959, 919, ..., 80, 40."""
    if n < 1:
        raise ValueError(f"dpm++{n}: need at least 1 step")
    ts = np.linspace(0, num_steps - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if len(set(ts.tolist())) != n:
        raise ValueError(f"dpm++{n}: cannot make {n} distinct steps from {num_steps}")
    return ts


def space_timesteps(num_steps: int, section_counts) -> set[int]:
    """Timesteps kept when respacing, exactly as respace.py: "250" (or "10,15,20" sections) spreads
    the counts evenly over equal sections with rounding; "ddimN" uses an integer stride. "dpm++N"
    (not in respace.py) keeps diffusers' DPM-Solver++ steps, see dpm_solver_timesteps."""
    if isinstance(section_counts, str):
        if section_counts.startswith("dpm++"):
            return set(dpm_solver_timesteps(num_steps, _int_suffix(section_counts, "dpm++")).tolist())
        if section_counts.startswith("ddim"):
            want = _int_suffix(section_counts, "ddim")
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == want:
                    return set(range(0, num_steps, stride))
            raise ValueError(f"timestep_respacing={section_counts!r}: cannot make exactly {want} "
                             f"steps from {num_steps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_steps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"timestep_respacing: cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(stride * j) for j in range(count)]
        start += size
    return set(steps)


def _int_suffix(spacing: str, prefix: str) -> int:
    try:
        return int(spacing[len(prefix):])
    except ValueError:
        raise ValueError(f"timestep_respacing={spacing!r}: expected {prefix}N with an integer N") from None


def sampler_for(spacing) -> str:
    """The sampler a spacing string selects: "ddimN" -> "ddim", "dpm++N" -> "dpm++2m", else "ddpm"."""
    if isinstance(spacing, str) and spacing.startswith("ddim"):
        return "ddim"
    if isinstance(spacing, str) and spacing.startswith("dpm++"):
        return "dpm++2m"
    return "ddpm"


# --------------------------------------------------------------------------------------------
# Closed-form densities (float32 jnp, as the torch code runs them)
# --------------------------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] quantised to 256 bins (bin width 2/255), edges open-ended."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# --------------------------------------------------------------------------------------------
# The process
# --------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """A (possibly respaced) diffusion process. Tables are numpy float64; arrays in and out are jnp.

    model_fn(x_t, t_original) -> (N, H, W, 2C) with learn_sigma (eps | variance interpolation v in
    [-1, 1]), (N, H, W, C) without.
    """

    SAMPLERS = ("ddpm", "ddim", "dpm++2m")

    def __init__(self, betas, *, learn_sigma: bool = True, rescale_learned_sigmas: bool = False,
                 timestep_map=None, sampler_kind: str = "ddpm"):
        if sampler_kind not in self.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler_kind!r}; choose one of {', '.join(self.SAMPLERS)}")
        self.sampler_kind = sampler_kind
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.learn_sigma = learn_sigma
        self.rescale_learned_sigmas = rescale_learned_sigmas
        tmap = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)
        self.timestep_map = jnp.asarray(tmap, jnp.int32)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; the log is clipped by repeating the t=1 value.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if self.num_timesteps > 1 else np.array([0.0]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _extract(table, t, ndim):
        """table[t] as float32, shaped (N, 1, ..., 1) to broadcast against an ndim array."""
        v = jnp.asarray(table, jnp.float32)[t]
        return v.reshape(v.shape + (1,) * (ndim - v.ndim))

    def _model(self, model_fn, x, t):
        return jnp.asarray(model_fn(x, self.timestep_map[t]), jnp.float32)

    # -- forward process -------------------------------------------------------------------

    def q_sample(self, x_start, t, noise):
        e = lambda a: self._extract(a, t, x_start.ndim)
        return e(self.sqrt_alphas_cumprod) * x_start + e(self.sqrt_one_minus_alphas_cumprod) * noise

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        e = lambda a: self._extract(a, t, x_t.ndim)
        mean = e(self.posterior_mean_coef1) * x_start + e(self.posterior_mean_coef2) * x_t
        return mean, e(self.posterior_variance), e(self.posterior_log_variance_clipped)

    # -- reverse process -------------------------------------------------------------------

    def p_mean_variance(self, model_output, x, t, clip_denoised: bool = False):
        """p(x_{t-1} | x_t) from a model output: dict(mean, variance, log_variance, pred_xstart)."""
        e = lambda a: self._extract(a, t, x.ndim)
        c = x.shape[-1]
        if self.learn_sigma:
            if model_output.shape[-1] != 2 * c:
                raise ValueError(f"learn_sigma needs {2 * c} output channels, got {model_output.shape[-1]}")
            eps, var_values = model_output[..., :c], model_output[..., c:]
            # Learned range: interpolate the log-variance between the posterior's and beta_t.
            min_log = e(self.posterior_log_variance_clipped)
            max_log = e(np.log(self.betas))
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = jnp.exp(log_variance)
        else:
            eps = model_output
            # Fixed large: beta_t, except at t=0 where the posterior variance gives a better decoder.
            large = np.append(self.posterior_variance[1], self.betas[1:])
            variance = e(large) + jnp.zeros_like(x)
            log_variance = e(np.log(large)) + jnp.zeros_like(x)
        pred_xstart = e(self.sqrt_recip_alphas_cumprod) * x - e(self.sqrt_recipm1_alphas_cumprod) * eps
        if clip_denoised:
            pred_xstart = jnp.clip(pred_xstart, -1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart, "eps": eps}

    # -- training --------------------------------------------------------------------------

    def vb_terms_bpd(self, model_output, x_start, x_t, t):
        """The VLB term in bits/dim: KL(q || p) for t > 0, the discretized decoder NLL at t == 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return jnp.where(t == 0, nll, kl)

    def training_losses(self, model_fn, x_start, t, noise):
        """dict(loss, mse, vb), each (N,). t indexes this (possibly respaced) process.

        The official DiT trains with LossType.MSE, so vb is added unscaled; the T/1000 factor of
        RESCALED_MSE (rescale_learned_sigmas=True) is 1 for the usual T=1000 anyway.
        """
        x_t = self.q_sample(x_start, t, noise)
        out = self._model(model_fn, x_t, t)
        c = x_start.shape[-1]
        eps = out[..., :c]
        terms = {"mse": mean_flat((noise - eps) ** 2)}
        if self.learn_sigma:
            # The VB term trains only the variance: the mean (eps) is frozen for it.
            frozen = jnp.concatenate([jax.lax.stop_gradient(eps), out[..., c:]], axis=-1)
            vb = self.vb_terms_bpd(frozen, x_start, x_t, t)
            if self.rescale_learned_sigmas:
                vb = vb * (self.num_timesteps / 1000.0)
            terms["vb"] = vb
        else:
            terms["vb"] = jnp.zeros_like(terms["mse"])
        terms["loss"] = terms["mse"] + terms["vb"]
        return terms

    # -- sampling --------------------------------------------------------------------------

    @staticmethod
    def _noise_fns(keys, shape):
        """(initial noise, per-step noise fn); sample i only ever touches keys[i]."""
        if keys.shape[0] != shape[0]:
            raise ValueError(f"need one key per sample: {keys.shape[0]} keys for shape {shape}")
        split = jax.vmap(jax.random.split)(keys)  # (N, 2, ...)
        init_keys, step_keys = split[:, 0], split[:, 1]
        normal = lambda k: jax.random.normal(k, tuple(shape[1:]), jnp.float32)
        x_T = jax.vmap(normal)(init_keys)
        step_noise = lambda t: jax.vmap(lambda k: normal(jax.random.fold_in(k, t)))(step_keys)
        return x_T, step_noise

    def _loop(self, step, x):
        def body(i, x):
            t = self.num_timesteps - 1 - i
            return step(x, jnp.full((x.shape[0],), t, jnp.int32), t)
        return jax.lax.fori_loop(0, self.num_timesteps, body, x)

    @staticmethod
    def _initial(x_T, noise):
        """The keys' initial noise, or `noise` when given (to run the same start as a peer sampler)."""
        if noise is None:
            return x_T
        if tuple(noise.shape) != tuple(x_T.shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x_T.shape)}")
        return jnp.asarray(noise, x_T.dtype)

    def p_sample_loop(self, model_fn, shape, keys, clip_denoised: bool = False, noise=None):
        """Ancestral (DDPM) sampling over all steps of this process; returns x_0.

        noise: optional initial x_T of `shape` replacing the keys' draw (the step noise still comes
        from the keys)."""
        x_T, step_noise = self._noise_fns(keys, shape)
        x_T = self._initial(x_T, noise)

        def step(x, t_vec, t):
            out = self.p_mean_variance(self._model(model_fn, x, t_vec), x, t_vec, clip_denoised)
            nonzero = (t_vec != 0).astype(jnp.float32).reshape(-1, *([1] * (x.ndim - 1)))
            return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * step_noise(t)

        return self._loop(step, x_T)

    def ddim_sample_loop(self, model_fn, shape, keys, eta: float = 0.0, clip_denoised: bool = False,
                         noise=None):
        """DDIM sampling (eta=0: deterministic given the initial noise); returns x_0.

        clip_denoised defaults to False here (ADM's default is True) since DiT works in latent space.
        noise: optional initial x_T, as in p_sample_loop.
        """
        x_T, step_noise = self._noise_fns(keys, shape)
        x_T = self._initial(x_T, noise)

        def step(x, t_vec, t):
            out = self.p_mean_variance(self._model(model_fn, x, t_vec), x, t_vec, clip_denoised)
            e = lambda a: self._extract(a, t_vec, x.ndim)
            # eps re-derived from the (possibly clipped) x_0 prediction, as in ADM.
            eps = (e(self.sqrt_recip_alphas_cumprod) * x - out["pred_xstart"]) / e(self.sqrt_recipm1_alphas_cumprod)
            abar, abar_prev = e(self.alphas_cumprod), e(self.alphas_cumprod_prev)
            sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
            mean = out["pred_xstart"] * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma ** 2) * eps
            nonzero = (t_vec != 0).astype(jnp.float32).reshape(-1, *([1] * (x.ndim - 1)))
            return mean + nonzero * sigma * step_noise(t)

        return self._loop(step, x_T)

    def dpm_solver_coefficients(self) -> np.ndarray:
        """(T, 3) float64: step from respaced index t to t-1 is x <- a x + b D0 + c (D0 - D1).

        DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2), written as diffusers'
        DPMSolverMultistepScheduler (algorithm_type="dpmsolver++", solver_order=2,
        solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero") runs it, with
        alpha_s = sqrt(abar_s), sigma_s = sqrt(1 - abar_s), lambda = log(alpha / sigma), h = lambda_t -
        lambda_s, and D0 = x0_pred(s), D1 = x0_pred of the previous step:
          first order  x_t = (sigma_t/sigma_s) x - alpha_t (e^-h - 1) D0
          second order   ... - 0.5 alpha_t (e^-h - 1) (h / h_prev) (D0 - D1)
        The first step (no history) and the last one (to sigma = 0, abar_prev = 1 at index 0, which
        returns x0_pred) are first order; the rest second order.
        """
        abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        alpha_s, sigma_s = np.sqrt(abar), np.sqrt(1.0 - abar)
        alpha_t, sigma_t = np.sqrt(abar_prev), np.sqrt(1.0 - abar_prev)
        with np.errstate(divide="ignore"):
            lam_s = np.log(alpha_s) - np.log(sigma_s)
            lam_t = np.log(alpha_t) - np.log(sigma_t)  # +inf where abar_prev == 1
        h = lam_t - lam_s
        expm = -np.expm1(-h)  # 1 - e^-h, exactly 1 for h = inf
        a = sigma_t / sigma_s
        b = alpha_t * expm
        # second order where a previous step exists (t < T-1) and t is not the last step (t > 0)
        h_prev = np.append(lam_s[:-1] - lam_s[1:], np.nan)  # lambda_s - lambda of index t+1
        idx = np.arange(self.num_timesteps)
        second = (idx < self.num_timesteps - 1) & (idx > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.where(second, 0.5 * b * h / h_prev, 0.0)
        return np.stack([a, b, c], axis=1)

    def dpm_solver_sample_loop(self, model_fn, shape, keys, noise=None):
        """DPM-Solver++(2M), deterministic given the initial noise; returns x_0 (the last step's data
        prediction). The model's eps is its first C output channels (the learned variance is unused,
        as DiTPipeline drops it before the scheduler). keys: one per sample, for the initial noise
        only; noise: optional initial x_T, as in p_sample_loop."""
        x_T, _ = self._noise_fns(keys, shape)
        x_T = self._initial(x_T, noise)
        coef = jnp.asarray(self.dpm_solver_coefficients(), jnp.float32)
        c = x_T.shape[-1]

        def body(i, carry):
            x, d_prev = carry
            t = self.num_timesteps - 1 - i
            t_vec = jnp.full((x.shape[0],), t, jnp.int32)
            eps = self._model(model_fn, x, t_vec)
            if self.learn_sigma:
                eps = eps[..., :c]
            e = lambda a: self._extract(a, t_vec, x.ndim)
            d0 = e(self.sqrt_recip_alphas_cumprod) * x - e(self.sqrt_recipm1_alphas_cumprod) * eps
            a, b, cc = coef[t, 0], coef[t, 1], coef[t, 2]
            return a * x + b * d0 + cc * (d0 - d_prev), d0

        x, _ = jax.lax.fori_loop(0, self.num_timesteps, body, (x_T, jnp.zeros_like(x_T)))
        return x

    def sample_loop(self, model_fn, shape, keys, noise=None):
        """The sampler this process was made for (`sampler_kind`): DDPM, DDIM (eta 0) or
        DPM-Solver++(2M), each without clipping (DiT samples latents)."""
        if self.sampler_kind == "ddim":
            return self.ddim_sample_loop(model_fn, shape, keys, noise=noise)
        if self.sampler_kind == "dpm++2m":
            return self.dpm_solver_sample_loop(model_fn, shape, keys, noise=noise)
        return self.p_sample_loop(model_fn, shape, keys, noise=noise)


def create_diffusion(timestep_respacing: str = "", noise_schedule: str = "linear",
                     learn_sigma: bool = True, diffusion_steps: int = 1000,
                     rescale_learned_sigmas: bool = False) -> GaussianDiffusion:
    """The DiT factory: "" keeps all `diffusion_steps`; "250", "ddim50" or "dpm++25" respaces, and
    the spacing picks `sampler_kind` ("ddpm", "ddim", "dpm++2m") for `sample_loop`."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    spacing = timestep_respacing or [diffusion_steps]
    use = sorted(space_timesteps(diffusion_steps, spacing))
    # Respaced betas keep the kept steps' alpha_cumprod exactly (respace.py).
    alphas_cumprod = np.cumprod(1.0 - betas)
    last, new_betas = 1.0, []
    for i in use:
        new_betas.append(1 - alphas_cumprod[i] / last)
        last = alphas_cumprod[i]
    return GaussianDiffusion(np.array(new_betas), learn_sigma=learn_sigma,
                             rescale_learned_sigmas=rescale_learned_sigmas, timestep_map=use,
                             sampler_kind=sampler_for(timestep_respacing))
