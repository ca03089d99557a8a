"""DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler.

Conventions matched (diffusers 0.42, schedulers/scheduling_dpmsolver_multistep.py), all the
scheduler's defaults except the DiT betas: algorithm_type="dpmsolver++", solver_order=2,
solver_type="midpoint", timestep_spacing="linspace" (set_timesteps: linspace(0, 999, N+1) rounded,
reversed, 0 dropped), final_sigmas_type="zero" (the last step goes to sigma 0 and returns the data
prediction), lower_order_final=True (the last step is first order; so is the first, having no
history), no thresholding, prediction_type="epsilon", betas linear 1e-4..0.02 over 1000 steps.
The scheduler gets eps only (variance_type None): DiTPipeline drops the learned variance before
calling step (pipeline_dit.py L216-220); its own variance_type="learned_range" path would keep
channels [:3], which is wrong for 4-channel latents.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dit.diffusion import GaussianDiffusion, create_diffusion  # noqa: E402


def dpm_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001,
                                       beta_end=0.02, algorithm_type="dpmsolver++", solver_order=2,
                                       solver_type="midpoint", prediction_type="epsilon", thresholding=False,
                                       lower_order_final=True, final_sigmas_type="zero",
                                       timestep_spacing="linspace")


def fake_eps(x, t):
    """A deterministic stand-in for the model: a fixed smooth function of (x, original t), NHWC."""
    tt = np.asarray(t, np.float64).reshape(-1, 1, 1, 1) / 1000.0
    return (0.9 * np.tanh(x) + 0.3 * np.sin(3.0 * tt + x) + 0.1 * tt).astype(np.float32)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def run_diffusers(steps, x_T):
    """The scheduler's x_t after every step, and the (t, model output) it was fed at each."""
    sched = dpm_scheduler()
    sched.set_timesteps(steps)
    x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
    xs, fed = [], []
    for t in sched.timesteps:
        out = fake_eps(x.numpy().transpose(0, 2, 3, 1), np.full(len(x), int(t)))
        fed.append((int(t), out))
        x = sched.step(torch.from_numpy(out.transpose(0, 3, 1, 2).copy()), t, x).prev_sample
        xs.append(x.numpy().transpose(0, 2, 3, 1))
    return xs, fed, sched


@pytest.mark.slow
@pytest.mark.parametrize("steps", [25, 10, 3])
def test_dpm_solver_matches_diffusers_step_by_step(steps):
    rng = np.random.default_rng(steps)
    x_T = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    theirs, fed, sched = run_diffusers(steps, x_T)

    d = create_diffusion(f"dpm++{steps}", learn_sigma=True)
    assert d.sampler_kind == "dpm++2m" and d.num_timesteps == steps
    np.testing.assert_array_equal(np.asarray(d.timestep_map)[::-1], sched.timesteps.numpy())

    # Ours, recording every x_t and what the model saw; the fake model returns eps | junk variance
    # channels (learn_sigma), which the solver must ignore.
    seen = []

    def model_fn(x, t):
        def host(x, t):
            seen.append(np.asarray(t))
            eps = fake_eps(np.asarray(x), np.asarray(t))
            return np.concatenate([eps, np.full_like(eps, 1e3)], axis=-1)
        spec = jax.ShapeDtypeStruct(x.shape[:-1] + (2 * x.shape[-1],), jnp.float32)
        return jax.pure_callback(host, spec, x, t)

    xs = []
    orig_fori = jax.lax.fori_loop

    def recording_fori(lo, hi, body, init):  # unrolled in Python so every x_t is visible
        carry = init
        for i in range(lo, hi):
            carry = body(i, carry)
            xs.append(np.asarray(carry[0]))
        return carry

    keys = jax.random.split(jax.random.key(0), 3)
    jax.lax.fori_loop = recording_fori
    try:
        out = d.dpm_solver_sample_loop(model_fn, x_T.shape, keys, noise=jnp.asarray(x_T))
    finally:
        jax.lax.fori_loop = orig_fori
    assert [int(t[0]) for t in seen] == [t for t, _ in fed]
    errs = [rel(a, b) for a, b in zip(xs, theirs)]
    print(f"dpm++{steps}: per-step max rel err {max(errs):.2e} (final {errs[-1]:.2e})")
    assert len(xs) == steps and max(errs) < 1e-5
    np.testing.assert_array_equal(np.asarray(out), xs[-1])
    # the jitted loop gives the same result as the unrolled one
    jitted = jax.jit(lambda k, n: d.sample_loop(model_fn, x_T.shape, k, noise=n))(keys, jnp.asarray(x_T))
    assert rel(jitted, theirs[-1]) < 1e-5


def test_dpm_solver_replayed_outputs_sensitive_to_conventions():
    """The step-by-step parity above would catch a wrong convention: each alternative is far off."""
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    theirs, _, _ = run_diffusers(10, x_T)
    d = create_diffusion("dpm++10", learn_sigma=False)
    fn = lambda x, t: jax.pure_callback(lambda x, t: fake_eps(np.asarray(x), np.asarray(t)),
                                        jax.ShapeDtypeStruct(x.shape, jnp.float32), x, t)
    keys = jax.random.split(jax.random.key(0), 2)
    ours = np.asarray(jax.jit(lambda k: d.sample_loop(fn, x_T.shape, k, noise=jnp.asarray(x_T)))(keys))
    assert rel(ours, theirs[-1]) < 1e-5
    # first order everywhere = DDIM over the same steps: a different answer
    coef = d.dpm_solver_coefficients()
    assert coef[0, 2] == 0 and coef[-1, 2] == 0 and (coef[1:-1, 2] != 0).all()
    first = GaussianDiffusion(d.betas, learn_sigma=False, timestep_map=np.asarray(d.timestep_map))
    ddim = np.asarray(jax.jit(lambda k: first.ddim_sample_loop(fn, x_T.shape, k, noise=jnp.asarray(x_T)))(keys))
    assert rel(ddim, theirs[-1]) > 1e-3


@pytest.mark.slow
def test_dpm_solver_loop_matches_dit_pipeline():
    """End to end: the real DiTPipeline with the DPM-Solver++ scheduler against our jitted loop with
    forward_with_cfg (as stages/sample.py builds it), a tiny random DiT converted to both sides, CFG 4
    on all 4 eps channels (the pipeline's guidance), the same initial noise and labels."""
    import test_pipeline_parity as pp
    from test_parity_diffusers import diffusers_model, random_official_state_dict

    from dit import convert
    from dit.models import DiT, dit_config

    steps, scale = 10, 4.0
    cfg = dit_config(None, input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=1000)
    sd = random_official_state_dict(cfg, seed=5)
    params = convert.official_to_params(sd, cfg)
    labels = np.array([7, 999, 123], np.int32)

    from diffusers import AutoencoderKL, DiTPipeline
    from diffusers.models.autoencoders.vae import DecoderOutput

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        layers_per_block=1, norm_num_groups=8, scaling_factor=1.0)
    got = {}

    def decode(z, *a, **k):
        got["z"] = z.clone()
        return DecoderOutput(sample=torch.zeros(z.shape[0], 3, 8, 8))

    vae.decode = decode
    pipe = DiTPipeline(transformer=diffusers_model(cfg, sd), vae=vae, scheduler=dpm_scheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe(class_labels=list(labels), guidance_scale=scale, num_inference_steps=steps,
         generator=torch.Generator().manual_seed(11), output_type="pt")
    theirs = got["z"].numpy().transpose(0, 2, 3, 1)
    x_T = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(11)).numpy().transpose(0, 2, 3, 1)

    model = DiT(cfg)
    d = create_diffusion(f"dpm++{steps}", learn_sigma=cfg.learn_sigma)
    y = jnp.concatenate([jnp.asarray(labels), jnp.full((3,), cfg.num_classes)])

    def model_fn(x, t):
        return model.apply({"params": params}, x, t, y, scale, None, method=DiT.forward_with_cfg)

    keys = jax.random.split(jax.random.key(0), 6)
    x2 = jnp.concatenate([jnp.asarray(x_T)] * 2)
    ours = np.asarray(jax.jit(lambda k, n: d.sample_loop(model_fn, x2.shape, k, noise=n))(keys, x2))[:3]
    err = pp.rel_err(ours, theirs)
    print(f"dpm++{steps} CFG {scale} DiTPipeline: max |ours - diffusers| / max |diffusers| = {err:.2e}")
    assert np.abs(theirs - x_T).max() > 0.1
    assert err < 2e-5
