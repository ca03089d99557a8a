"""Gaussian diffusion: schedules, respacing, closed forms (numpy float64), losses, samplers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr

from dit import diffusion as gd
from dit.diffusion import create_diffusion


def test_linear_betas_and_respacing():
    d = create_diffusion("")
    assert d.num_timesteps == 1000
    np.testing.assert_allclose(d.betas[[0, -1]], [1e-4, 0.02])
    np.testing.assert_array_equal(d.timestep_map, np.arange(1000))

    d250 = create_diffusion("250")
    tmap = np.asarray(d250.timestep_map)
    assert d250.num_timesteps == 250 and tmap[0] == 0 and tmap[-1] == 999
    stride = 999 / 249
    np.testing.assert_array_equal(tmap, [round(stride * j) for j in range(250)])
    # respaced betas preserve alpha_bar at the kept steps
    np.testing.assert_allclose(d250.alphas_cumprod, d.alphas_cumprod[tmap], rtol=1e-12)
    np.testing.assert_allclose(d250.betas[0], d.betas[0])

    d50 = create_diffusion("ddim50")
    np.testing.assert_array_equal(d50.timestep_map, np.arange(0, 1000, 20))
    np.testing.assert_allclose(d50.alphas_cumprod, d.alphas_cumprod[::20], rtol=1e-12)
    # sections of 50 steps: 10 evenly over 0..49, 20 evenly over 50..99 (python rounding)
    assert gd.space_timesteps(100, "10,20") == ({round(49 / 9 * j) for j in range(10)}
                                               | {50 + round(49 / 19 * j) for j in range(20)})
    with pytest.raises(ValueError, match="ddim7"):
        create_diffusion("ddim7", diffusion_steps=10)
    with pytest.raises(ValueError):
        create_diffusion("2000")
    with pytest.raises(ValueError, match="noise_schedule"):
        create_diffusion("", noise_schedule="quadratic")
    cos = create_diffusion("", noise_schedule="squaredcos_cap_v2")
    assert cos.betas.max() <= 0.999 and cos.num_timesteps == 1000


@pytest.mark.parametrize("respacing", ["", "250"])
def test_posterior_against_bayes_rule(respacing):
    d = create_diffusion(respacing)
    rng = np.random.default_rng(0)
    t = np.array([1, 2, 50, d.num_timesteps - 1])
    x0, xt = rng.normal(size=(2, 4, 3, 3, 2))
    mean, var, logvar = d.q_posterior_mean_variance(jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.asarray(t))
    # product of q(x_{t-1}|x_0) = N(sqrt(abar_{t-1}) x0, 1-abar_{t-1}) and q(x_t|x_{t-1}) = N(sqrt(a_t) x_{t-1}, b_t)
    abar_prev = d.alphas_cumprod_prev[t][:, None, None, None]
    beta = d.betas[t][:, None, None, None]
    prec = 1 / (1 - abar_prev) + (1 - beta) / beta
    want_var = 1 / prec
    want_mean = want_var * (np.sqrt(abar_prev) * x0 / (1 - abar_prev) + np.sqrt(1 - beta) * xt / beta)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.broadcast_to(var, want_var.shape), want_var, rtol=1e-5)
    np.testing.assert_allclose(np.broadcast_to(logvar, want_var.shape), np.log(want_var), rtol=1e-5)
    # at t = 0 the log variance is clipped to the t = 1 value
    _, _, lv0 = d.q_posterior_mean_variance(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.array([0]))
    np.testing.assert_allclose(float(lv0[0, 0]), math.log(d.posterior_variance[1]), rtol=1e-6)


def test_q_sample():
    d = create_diffusion("")
    x0 = jnp.ones((2, 2, 2, 1))
    noise = jnp.full_like(x0, 2.0)
    t = jnp.array([0, 999])
    out = d.q_sample(x0, t, noise)
    abar = d.alphas_cumprod[[0, 999]]
    want = np.sqrt(abar) + np.sqrt(1 - abar) * 2.0
    np.testing.assert_allclose(out[:, 0, 0, 0], want, rtol=1e-6)


def test_normal_kl_closed_form():
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(2, 100))
    lv1, lv2 = rng.normal(size=(2, 100))
    s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
    want = np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    got = gd.normal_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gd.normal_kl(0.3, 0.1, 0.3, 0.1), 0.0, atol=1e-7)


def test_discretized_gaussian_nll_closed_form():
    rng = np.random.default_rng(2)
    x = np.concatenate([[-1.0, 1.0], rng.integers(1, 255, size=98) / 127.5 - 1.0])
    means = x + rng.normal(scale=0.01, size=x.shape)
    log_scales = np.log(rng.uniform(0.004, 0.05, size=x.shape))
    got = np.asarray(gd.discretized_gaussian_log_likelihood(*(jnp.asarray(a, jnp.float32) for a in (x, means, log_scales))))
    # exact: the Gaussian mass of the pixel's bin [x - 1/255, x + 1/255], open-ended at the edges
    s = np.exp(log_scales)
    hi = np.where(x > 0.999, 1.0, ndtr((x + 1 / 255 - means) / s))
    lo = np.where(x < -0.999, 0.0, ndtr((x - 1 / 255 - means) / s))
    want = np.log(hi - lo)
    assert np.all(got <= 1e-6)
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3)  # ADM uses a tanh approximation of the cdf


def _ref_losses(d, eps_pred, var_v, x0, noise, t):
    """numpy float64 reference of the official MSE + VB loss (learned-range variance)."""
    ac, acp, b = d.alphas_cumprod[t], d.alphas_cumprod_prev[t], d.betas[t]
    sh = (-1, 1, 1, 1)
    ac, acp, b = ac.reshape(sh), acp.reshape(sh), b.reshape(sh)
    xt = np.sqrt(ac) * x0 + np.sqrt(1 - ac) * noise
    pvar = b * (1 - acp) / (1 - ac)
    plog = d.posterior_log_variance_clipped[t].reshape(sh)
    tmean = (b * np.sqrt(acp) / (1 - ac)) * x0 + ((1 - acp) * np.sqrt(1 - b) / (1 - ac)) * xt
    frac = (var_v + 1) / 2
    mlog = frac * np.log(b) + (1 - frac) * plog
    px0 = np.sqrt(1 / ac) * xt - np.sqrt(1 / ac - 1) * eps_pred
    mmean = (b * np.sqrt(acp) / (1 - ac)) * px0 + ((1 - acp) * np.sqrt(1 - b) / (1 - ac)) * xt
    kl = 0.5 * (-1 + mlog - plog + np.exp(plog - mlog) + (tmean - mmean) ** 2 * np.exp(-mlog))
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
    inv = np.exp(-0.5 * mlog)
    cp, cm = cdf(inv * (x0 - mmean + 1 / 255)), cdf(inv * (x0 - mmean - 1 / 255))
    ll = np.where(x0 < -0.999, np.log(np.maximum(cp, 1e-12)),
                  np.where(x0 > 0.999, np.log(np.maximum(1 - cm, 1e-12)), np.log(np.maximum(cp - cm, 1e-12))))
    axes = (1, 2, 3)
    vb = np.where(t == 0, -ll.mean(axes), kl.mean(axes)) / np.log(2)
    mse = ((noise - eps_pred) ** 2).mean(axes)
    return mse, vb


@pytest.mark.slow
def test_training_losses_match_reference_and_freeze_the_mean():
    d = create_diffusion("")
    rng = np.random.default_rng(3)
    n = 5
    x0 = np.clip(rng.normal(scale=0.5, size=(n, 4, 4, 3)), -1, 1)
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0  # exercise the edge bins at t = 0
    noise = rng.normal(size=x0.shape)
    out = rng.normal(scale=0.5, size=(n, 4, 4, 6))
    t = np.array([0, 1, 10, 500, 999])
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    model_fn = lambda x, tt: f32(out)
    terms = d.training_losses(model_fn, f32(x0), jnp.asarray(t), f32(noise))
    mse, vb = _ref_losses(d, out[..., :3], out[..., 3:], x0, noise, t)
    np.testing.assert_allclose(terms["mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(terms["vb"], vb, rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(terms["loss"], terms["mse"] + terms["vb"], rtol=1e-6)

    # The VB term must not train eps, and the MSE term must not train the variance.
    def parts(o):
        tr = d.training_losses(lambda x, tt: o, f32(x0), jnp.asarray(t), f32(noise))
        return tr["vb"].sum(), tr["mse"].sum()
    g_vb = jax.grad(lambda o: parts(o)[0])(f32(out))
    g_mse = jax.grad(lambda o: parts(o)[1])(f32(out))
    np.testing.assert_array_equal(g_vb[..., :3], 0)
    assert float(jnp.abs(g_vb[..., 3:]).max()) > 0
    np.testing.assert_array_equal(g_mse[..., 3:], 0)


@pytest.mark.slow
def test_model_receives_original_timesteps():
    d = create_diffusion("ddim50")
    seen = {}

    def model_fn(x, t):
        seen["t"] = t
        return jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],))
    d.training_losses(model_fn, jnp.zeros((3, 2, 2, 1)), jnp.array([0, 1, 49]), jnp.zeros((3, 2, 2, 1)))
    np.testing.assert_array_equal(seen["t"], [0, 20, 980])


def toy_model(x, t):
    """Elementwise in x and per-sample in t: exact whatever the batch."""
    eps = 0.3 * x + (t.astype(jnp.float32) / 1000.0)[:, None, None, None]
    return jnp.concatenate([eps, jnp.tanh(x)], axis=-1)


@pytest.mark.slow
def test_ddim_eta0_is_deterministic_and_matches_reference():
    d = create_diffusion("ddim10")
    keys = jax.random.split(jax.random.key(0), 3)
    shape = (3, 4, 4, 2)
    run = jax.jit(lambda k: d.ddim_sample_loop(toy_model, shape, k, eta=0.0))
    a = np.asarray(run(keys))
    b = np.asarray(run(keys))
    np.testing.assert_array_equal(a, b)
    # reference recursion in numpy float64 from the same initial noise
    x_T = np.asarray(jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[0], shape[1:]))(keys), np.float64)
    x = x_T
    tmap = np.asarray(d.timestep_map)
    for t in range(d.num_timesteps - 1, -1, -1):
        eps = 0.3 * x + tmap[t] / 1000.0
        ab, abp = d.alphas_cumprod[t], d.alphas_cumprod_prev[t]
        x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
        x = np.sqrt(abp) * x0 + np.sqrt(1 - abp) * eps
    np.testing.assert_allclose(a, x, rtol=1e-4, atol=1e-4)
    # eta > 0 adds noise
    c = np.asarray(d.ddim_sample_loop(toy_model, shape, keys, eta=1.0))
    assert np.abs(c - a).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_per_sample_keys_independent_of_batch(sampler):
    d = create_diffusion("10")
    keys = jax.random.split(jax.random.key(7), 4)
    shape = (4, 4, 4, 2)

    def sample(k, n):
        if sampler == "ddpm":
            return d.p_sample_loop(toy_model, (n,) + shape[1:], k)
        return d.ddim_sample_loop(toy_model, (n,) + shape[1:], k, eta=1.0)

    full = np.asarray(jax.jit(lambda k: sample(k, 4))(keys))
    one = np.asarray(jax.jit(lambda k: sample(k, 1))(keys[2:3]))
    np.testing.assert_array_equal(full[2:3], one)
    # reordering the batch reorders the samples and changes nothing else
    perm = np.array([3, 1, 0, 2])
    shuffled = np.asarray(jax.jit(lambda k: sample(k, 4))(keys[perm]))
    np.testing.assert_array_equal(shuffled, full[perm])
    assert np.abs(full[0] - full[1]).max() > 1e-2
    with pytest.raises(ValueError, match="one key per sample"):
        d.p_sample_loop(toy_model, (3,) + shape[1:], keys)


@pytest.mark.slow
def test_dit_sample_same_in_batch_of_one_and_four():
    from dit.models import DiT, dit_config, init_params
    cfg = dit_config(input_size=8, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=5)
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), params)
    d = create_diffusion("5")
    keys = jax.random.split(jax.random.key(3), 4)
    y = jnp.array([0, 1, 2, 3])

    def sample(k, yy):
        fn = lambda x, t: DiT(cfg).apply({"params": params}, x, t, yy)
        return d.p_sample_loop(fn, (yy.shape[0], 8, 8, 4), k)
    full = np.asarray(jax.jit(sample)(keys, y))
    one = np.asarray(jax.jit(sample)(keys[1:2], y[1:2]))
    np.testing.assert_allclose(full[1:2], one, rtol=1e-5, atol=1e-5)


def test_spacing_strings_select_the_sampler():
    assert create_diffusion("250").sampler_kind == "ddpm"
    assert create_diffusion("").sampler_kind == "ddpm"
    assert create_diffusion("ddim50").sampler_kind == "ddim"
    assert create_diffusion("dpm++25").sampler_kind == "dpm++2m"
    np.testing.assert_array_equal(gd.dpm_solver_timesteps(1000, 25)[:3], [999, 959, 919])
    assert gd.dpm_solver_timesteps(1000, 25)[-1] == 40
    for bad in ("dpm++0", "dpm++x", "dpm++1000", "ddimx"):
        with pytest.raises(ValueError):
            create_diffusion(bad)
    with pytest.raises(ValueError, match="unknown sampler"):
        gd.GaussianDiffusion(np.full(3, 0.1), sampler_kind="euler")


def test_sample_loop_dispatches_and_dpm_ignores_keys_after_the_start(monkeypatch):
    for spacing, method in (("10", "p_sample_loop"), ("ddim10", "ddim_sample_loop"),
                            ("dpm++10", "dpm_solver_sample_loop")):
        d = create_diffusion(spacing)
        monkeypatch.setattr(d, method, lambda *a, **k: (method, a, k))
        assert d.sample_loop("fn", "shape", "keys", noise="x_T") == (method, ("fn", "shape", "keys"),
                                                                     {"noise": "x_T"})
    # DPM-Solver++ uses the keys only for x_T: given x_T, other keys change nothing
    toy = lambda x, t: jnp.concatenate([0.3 * x + (t / 1000.0)[:, None, None, None], jnp.tanh(x)], -1)
    shape = (2, 4, 4, 2)
    d = create_diffusion("dpm++10")
    run = jax.jit(lambda k, n: d.sample_loop(toy, shape, k, noise=n))
    x_T = jax.random.normal(jax.random.key(5), shape)
    a = run(jax.random.split(jax.random.key(1), 2), x_T)
    b = run(jax.random.split(jax.random.key(9), 2), x_T)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(np.asarray(a)).all() and np.abs(np.asarray(a) - np.asarray(x_T)).max() > 0.1
