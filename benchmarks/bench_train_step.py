"""Train-step throughput: our JAX DiT vs diffusers' PyTorch DiTTransformer2DModel, same run.

One step = forward + backward + AdamW update of DiT-S/2 on a batch of 32x32x4 latents with the DiT
diffusion loss (MSE + VB, learned-range variance). Both sides use the same shapes, loss and optimizer
settings (lr 1e-4, weight decay 0). Compile time of ours is reported apart from the steady state.

    python benchmarks/bench_train_step.py [--batch 8] [--rounds 5] [--steps 3] [--model DiT-S/2] [--single-thread]

The two sides are timed in alternating rounds (ours `steps` steps, then the peer's, `rounds` times)
so that load from other processes on a shared machine hits both alike; the report gives each
side's median and best round in wall time and its median process CPU time per step.
--single-thread runs both sides on one thread (XLA without its Eigen thread pool, torch with 1
thread): a steadier comparison of the work each side does when other jobs share the machine. (`--xla_cpu_use_thunk_runtime=false` is no longer supported by the
XLA in jax 0.10 -- it only prints a warning -- so no XLA flags are set here.)

The report ends with the GEMM floor: every matmul of the linear layers in one step (forward y = xW,
backward dx = dy W^T and dW = x^T dy, for qkv, proj, fc1 and fc2 of every block), each timed on its own in
XLA and in torch. These are ~97% of the step's flops, so "peer step / our GEMM floor" bounds the ratio
ours could reach if everything else -- attention, norms, activations, AdamW -- cost nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe  # noqa: E402

import numpy as np  # noqa: E402


def setup_ours(model_name, batch, seed=0):
    """Returns (compile seconds, run(n) -> seconds for n train steps)."""
    import jax
    import jax.numpy as jnp
    import optax

    from dit.diffusion import create_diffusion
    from dit.models import DiT, dit_config, init_params

    cfg = dit_config(model_name)
    model = DiT(cfg)
    diffusion = create_diffusion("")
    opt = optax.adamw(1e-4, weight_decay=0.0)
    params = init_params(cfg, jax.random.key(seed))
    state = {"params": params, "opt": opt.init(params), "i": 0}

    def loss_fn(p, x, y, t, noise, key):
        fn = lambda xt, tt: model.apply({"params": p}, xt, tt, y, train=True, rngs={"dropout": key})
        return diffusion.training_losses(fn, x, t, noise)["loss"].mean()

    def step(p, s, x, y, key):
        k_t, k_n, k_d = jax.random.split(key, 3)
        t = jax.random.randint(k_t, (x.shape[0],), 0, diffusion.num_timesteps)
        noise = jax.random.normal(k_n, x.shape)
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y, t, noise, k_d)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, cfg.input_size, cfg.input_size, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    key = jax.random.key(seed)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(state["params"], state["opt"], x, y, key).compile()
    compile_s = time.perf_counter() - t0

    def run(n):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            state["params"], state["opt"], loss = compiled(state["params"], state["opt"], x, y,
                                                           jax.random.fold_in(key, state["i"]))
            state["i"] += 1
        jax.block_until_ready(loss)
        return time.perf_counter() - t0, time.process_time() - c0

    return compile_s, run


def setup_peer(model_name, batch, seed=0):
    """diffusers' DiTTransformer2DModel + torch AdamW + the same loss; returns run(n) -> seconds."""
    import torch
    from diffusers import DiTTransformer2DModel

    from dit.diffusion import create_diffusion
    from dit.models import dit_config

    torch.manual_seed(seed)
    cfg = dit_config(model_name)
    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=4, out_channels=8, num_layers=cfg.depth, sample_size=cfg.input_size,
        patch_size=cfg.patch_size, num_embeds_ada_norm=1000, norm_eps=1e-6).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    d = create_diffusion("")
    tab = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)
    sqrt_ac, sqrt_1m = tab(d.sqrt_alphas_cumprod), tab(d.sqrt_one_minus_alphas_cumprod)
    c1, c2 = tab(d.posterior_mean_coef1), tab(d.posterior_mean_coef2)
    plog, logb = tab(d.posterior_log_variance_clipped), tab(np.log(d.betas))
    r_ac, r_m1 = tab(d.sqrt_recip_alphas_cumprod), tab(d.sqrt_recipm1_alphas_cumprod)

    def loss_fn(x0):
        # The official training_losses (MSE + VB with frozen mean), written out in torch, NCHW.
        n = x0.shape[0]
        t = torch.randint(0, 1000, (n,))
        noise = torch.randn_like(x0)
        e = lambda a: a[t].view(n, 1, 1, 1)
        xt = e(sqrt_ac) * x0 + e(sqrt_1m) * noise
        out = model(xt, t, torch.randint(0, 1000, (n,))).sample
        eps, v = out[:, :4], out[:, 4:]
        frac = (v + 1) / 2
        logvar = frac * e(logb) + (1 - frac) * e(plog)
        px0 = e(r_ac) * xt - e(r_m1) * eps.detach()
        mean = e(c1) * px0 + e(c2) * xt
        tmean = e(c1) * x0 + e(c2) * xt
        kl = 0.5 * (-1 + logvar - e(plog) + torch.exp(e(plog) - logvar) + (tmean - mean) ** 2 * torch.exp(-logvar))
        vb = kl.mean(dim=(1, 2, 3)) / math.log(2.0)  # (the t == 0 decoder NLL is left out: same cost class)
        return (((noise - eps) ** 2).mean(dim=(1, 2, 3)) + vb).mean()

    x = torch.randn(batch, 4, cfg.input_size, cfg.input_size)

    def run(n):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(x)
            loss.backward()
            opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    return run, torch.get_num_threads()


def block_gemms(cfg, batch):
    """(M, K, N) of each linear-layer matmul in one block's forward and backward."""
    m, d, h = batch * cfg.num_patches, cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    shapes = []
    for k, n in ((d, 3 * d), (d, d), (d, h), (h, d)):  # qkv, proj, fc1, fc2
        shapes += [(m, k, n), (m, n, k), (k, m, n)]  # y = x W, dx = dy W^T, dW = x^T dy
    return shapes


def gemm_floor(model_name, batch, repeats=5):
    """Seconds per step that the linear layers' matmuls alone take: (ours in XLA, peer in torch)."""
    import jax
    import torch

    from dit.models import dit_config

    cfg = dit_config(model_name)
    rng = np.random.default_rng(0)
    mm = jax.jit(lambda a, b: a @ b)
    total = {"ours": 0.0, "peer": 0.0}
    for m, k, n in block_gemms(cfg, batch):
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb, ta, tb = jax.device_put(a), jax.device_put(b), torch.from_numpy(a), torch.from_numpy(b)
        for name, fn in (("ours", lambda: mm(ja, jb).block_until_ready()), ("peer", lambda: ta @ tb)):
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            total[name] += cfg.depth * float(np.median(times))
    return total["ours"], total["peer"]


def main(argv=None):
    print(describe(), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="DiT-S/2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per round and side")
    ap.add_argument("--single-thread", action="store_true", help="one thread on each side")
    args = ap.parse_args(argv)
    if args.single_thread:  # before jax and torch are imported (they are imported lazily below)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
        import torch

        torch.set_num_threads(1)
    print(f"{args.model}, batch {args.batch}, 32x32x4 latents, fwd+bwd+AdamW; {args.rounds} rounds x "
          f"{args.steps} steps per side; {os.cpu_count()} CPUs{', single thread' if args.single_thread else ''}")
    compile_s, ours = setup_ours(args.model, args.batch)
    peer, threads = setup_peer(args.model, args.batch)
    ours(1), peer(1)  # warm-up
    rounds = {"ours": [], "peer": []}
    for _ in range(args.rounds):
        for name, run in (("ours", ours), ("peer", peer)):
            wall, cpu = run(args.steps)
            rounds[name].append((wall / args.steps, cpu / args.steps))
    med = lambda v: float(np.median(v))
    stats = {}
    for name, label in (("ours", f"ours (JAX/Flax, jit; compile {compile_s:.1f} s)"),
                        ("peer", f"peer (diffusers DiTTransformer2DModel, PyTorch, {threads} threads)")):
        wall = [w for w, _ in rounds[name]]
        cpu = [c for _, c in rounds[name]]
        stats[name] = (med(wall), min(wall), med(cpu))
        print(f"{label}:\n    wall: median {args.batch / med(wall):.2f} img/s ({1000 * med(wall):.0f} ms/step), "
              f"best {args.batch / min(wall):.2f} img/s; CPU time {1000 * med(cpu):.0f} ms/step")
    (ow, ob, oc), (pw, pb, pc) = stats["ours"], stats["peer"]
    per_round = ", ".join(f"{p[0] / o[0]:.2f}" for o, p in zip(rounds["ours"], rounds["peer"]))
    print(f"ratio ours/peer (img/s): wall median {pw / ow:.2f}x, wall best {pb / ob:.2f}x, "
          f"CPU time {pc / oc:.2f}x; per round (wall) {per_round}")
    print("(on a machine shared with other jobs, wall times swing with their load; CPU time per step "
          "is the steadier measure of the work each side does)")
    floor_ours, floor_peer = gemm_floor(args.model, args.batch)
    print(f"GEMM floor (linear-layer matmuls of one step, fwd+bwd, each timed alone): ours {1000 * floor_ours:.0f} ms "
          f"({100 * floor_ours / ow:.0f}% of our step), peer {1000 * floor_peer:.0f} ms ({100 * floor_peer / pw:.0f}% "
          f"of its step); the highest ratio ours could reach with everything else free: {pw / floor_ours:.2f}x")


if __name__ == "__main__":
    main()
