"""Guided DDPM sampling throughput: our jitted loop vs diffusers' DiTTransformer2DModel + DDPMScheduler.

DiT-S/2, 32x32x4 latents, batch 8 (16 model rows with CFG), CFG scale 1.5 on all 4 eps channels,
N DDPM steps, decoding excluded. Both sides get the same random weights, built as the diffusers
parity test builds them (tests/test_parity_diffusers.py: one random official-format state dict
converted to ours and to diffusers'). Ours is jit(p_sample_loop) with DiT.forward_with_cfg -- the
maths stages/sample.py runs, minus the VAE decode, spread over params.yaml's `sample.cpu_devices` XLA:CPU
devices as the stage spreads its chunks (`--devices 1`: one device); the peer is the real DiTPipeline.__call__ with a
DDPMScheduler (linear betas, fixed-small variance as the pipeline drops the learned one) and its VAE
decode stubbed out.

    python benchmarks/bench_sample.py [--steps 20] [--batch 8] [--rounds 3] [--single-thread]

Sides are timed in alternating rounds (one whole N-step sample each, per round) so load from other
jobs on a shared machine hits both alike; the report gives the median and best round in wall time
and the median process CPU time. Our compile time (lower + compile) is reported apart.

GFLOP/s are counted as 2 flops per multiply-add ("2x"): dit.flops counts a multiply-add as one flop
(the paper's convention), so model flops per sample = 2 x dit.flops x 2 rows (CFG) x steps. Only
the model's dots count (linears, patch embed, attention QK^T and AV). The same run times a plain
float32 GEMM of the model's biggest linear layer (M = 2*batch*256 tokens, K = 384, N = 1536: fc1)
in XLA and in torch, so the distance to this CPU's reachable rate is visible.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from machine import cpu_model, pin_to_one_cpu, stage_cpu_devices  # noqa: E402

SCALE = 1.5


def weights(model_name, seed=0):
    from test_parity_diffusers import random_official_state_dict

    from dit.models import dit_config

    cfg = dit_config(model_name)
    return cfg, random_official_state_dict(cfg, seed=seed)


def setup_ours(cfg, sd, batch, steps, devices=1, one_at_a_time=False):
    """Returns (lower s, compile s, run() -> final latents). The batch is spread over `devices` CPU devices
    (batch / devices samples each, under shard_map), as the sample stage spreads its chunks; with
    `one_at_a_time` each device loops over its samples (lax.map), as `sample.batch_invariant` runs them."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P

    from dit import convert
    from dit.diffusion import create_diffusion
    from dit.models import DiT

    if batch % devices:
        raise SystemExit(f"--batch {batch} is not divisible by --devices {devices}")
    params = jax.device_put(convert.official_to_params(sd, cfg))
    model = DiT(cfg)
    d = create_diffusion(str(steps), learn_sigma=cfg.learn_sigma)

    def sample(params, keys, labels):  # as stages/sample.py's chunk, without the VAE decode
        shape = (2 * keys.shape[0], cfg.input_size, cfg.input_size, cfg.in_channels)
        keys2 = jnp.concatenate([keys, keys])
        y = jnp.concatenate([labels, jnp.full_like(labels, cfg.num_classes)])

        def model_fn(x, t):
            return model.apply({"params": params}, x, t, y, SCALE, None, method=DiT.forward_with_cfg)

        return d.p_sample_loop(model_fn, shape, keys2)[:keys.shape[0]]

    if one_at_a_time:
        batched = sample

        def sample(params, keys, labels):
            return jax.lax.map(lambda a: batched(params, a[0][None], a[1][None])[0], (keys, labels))

    keys = jax.random.split(jax.random.key(0), batch)
    labels = jnp.arange(batch, dtype=jnp.int32) * 37 % cfg.num_classes
    mesh = Mesh(np.asarray(jax.devices("cpu")[:devices]), ("d",))
    spread = jax.shard_map(sample, mesh=mesh, in_specs=(P(), P("d"), P("d")), out_specs=P("d"))
    t0 = time.perf_counter()
    lowered = jax.jit(spread).lower(params, keys, labels)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, lambda: jax.block_until_ready(compiled(params, keys, labels))


def setup_peer(cfg, sd, batch, steps):
    """DiTPipeline(DiTTransformer2DModel, DDPMScheduler) with the decode stubbed; run() -> latents."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline
    from diffusers.models.autoencoders.vae import DecoderOutput
    from test_parity_diffusers import diffusers_model

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=cfg.in_channels, block_out_channels=(8,),
                        layers_per_block=1, norm_num_groups=8, scaling_factor=1.0)
    got = {}

    def decode(z, *a, **k):  # decoding excluded: keep the latents, return a dummy image
        got["z"] = z
        return DecoderOutput(sample=torch.zeros(z.shape[0], 3, 8, 8))

    vae.decode = decode
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                          clip_sample=False)
    pipe = DiTPipeline(transformer=diffusers_model(cfg, sd), vae=vae, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    labels = [int(i * 37 % cfg.num_classes) for i in range(batch)]

    def run():
        pipe(class_labels=labels, guidance_scale=SCALE, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(0), output_type="pt")
        return got["z"]

    return run, torch.get_num_threads()


def model_gflop(cfg, batch, steps) -> float:
    """2 x (multiply-adds of one forward) x 2 CFG rows x batch x steps, in GFLOP."""
    from dit.flops import count_flops

    return 2 * count_flops(cfg) / 1e9 * 2 * batch * steps


def gemm_rates(m, k, n, repeats=5):
    """GFLOP/s (2 flops per multiply-add) of one float32 (m,k)@(k,n): (XLA, torch), best of `repeats`."""
    import jax
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    mm = jax.jit(lambda a, b: a @ b)
    ja, jb, ta, tb = jax.device_put(a), jax.device_put(b), torch.from_numpy(a), torch.from_numpy(b)
    rates = []
    for fn in (lambda: mm(ja, jb).block_until_ready(), lambda: ta @ tb):
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        rates.append(2 * m * k * n / best / 1e9)
    return rates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="DiT-S/2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="DDPM steps")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--single-thread", action="store_true", help="one thread on each side")
    ap.add_argument("--devices", type=int, default=None,
                    help="XLA:CPU devices ours spreads the batch over (default: params.yaml's sample.cpu_devices, "
                         "as the sample stage does on CPU; 1 = one device)")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="ours runs each device's samples one at a time, as sample.batch_invariant: true")
    args = ap.parse_args(argv)
    if args.single_thread:  # before jax and torch are imported
        pin_to_one_cpu()
        import torch

        torch.set_num_threads(1)
    args.devices = stage_cpu_devices("sample", args.devices)  # before any JAX work
    import jax
    import torch

    print(f"{args.model}, batch {args.batch} (x2 rows for CFG {SCALE}), 32x32x4 latents, {args.steps} DDPM steps, "
          f"decoding excluded; {args.rounds} rounds per side; CPU: {cpu_model()}, {os.cpu_count()} cores; "
          f"jax {jax.__version__}, torch {torch.__version__}{', single thread' if args.single_thread else ''}")
    cfg, sd = weights(args.model)
    lower_s, compile_s, ours = setup_ours(cfg, sd, args.batch, args.steps, args.devices,
                                          one_at_a_time=args.batch_invariant)
    peer, threads = setup_peer(cfg, sd, args.batch, args.steps)
    t0 = time.perf_counter()
    z_ours = np.asarray(ours())  # first call: the compiled program's first run
    first_s = time.perf_counter() - t0
    peer()
    rounds = {"ours": [], "peer": []}
    for _ in range(args.rounds):
        for name, run in (("ours", ours), ("peer", peer)):
            w0, c0 = time.perf_counter(), time.process_time()
            run()
            rounds[name].append((time.perf_counter() - w0, time.process_time() - c0))
    assert np.isfinite(z_ours).all()
    gflop = model_gflop(cfg, args.batch, args.steps)
    med = lambda v: float(np.median(v))
    stats = {}
    split = f"{args.devices} XLA:CPU devices x {args.batch // args.devices}" if args.devices > 1 else "one device"
    split += ", one sample at a time (batch_invariant)" if args.batch_invariant else ""
    for name, label in (("ours", f"ours (JAX/Flax jit(p_sample_loop + forward_with_cfg), {split}; lower {lower_s:.1f} s, "
                                 f"compile {compile_s:.1f} s, first run {first_s:.1f} s)"),
                        ("peer", f"peer (diffusers DiTPipeline: DiTTransformer2DModel + DDPMScheduler, PyTorch, "
                                 f"{threads} threads)")):
        wall = [w for w, _ in rounds[name]]
        cpu = [c for _, c in rounds[name]]
        stats[name] = (med(wall), min(wall), med(cpu))
        print(f"{label}:\n    wall: median {args.batch / med(wall):.3f} img/s ({med(wall):.2f} s per batch), "
              f"best {args.batch / min(wall):.3f} img/s; CPU time {med(cpu):.2f} s per batch; "
              f"model {gflop / med(wall):.1f} GFLOP/s (median), {gflop / min(wall):.1f} (best)")
    (ow, ob, oc), (pw, pb, pc) = stats["ours"], stats["peer"]
    per_round = ", ".join(f"{p[0] / o[0]:.2f}" for o, p in zip(rounds["ours"], rounds["peer"]))
    print(f"ratio ours/peer (img/s): wall median {pw / ow:.2f}x, wall best {pb / ob:.2f}x, CPU time {pc / oc:.2f}x; "
          f"per round (wall) {per_round}")
    m, k, n = 2 * args.batch * cfg.num_patches, cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    xla, tor = gemm_rates(m, k, n)
    print(f"model work: {gflop:.0f} GFLOP per batch (2 flops per multiply-add; dit.flops x 2 x 2 CFG rows x "
          f"{args.batch} x {args.steps} steps)")
    print(f"plain float32 GEMM {m}x{k}x{n} (the fc1 shape), best of 5: XLA {xla:.1f} GFLOP/s, torch {tor:.1f} "
          f"GFLOP/s; ours reaches {100 * gflop / ob / xla:.0f}% of XLA's GEMM rate, the peer "
          f"{100 * gflop / pb / tor:.0f}% of torch's (best rounds)")


if __name__ == "__main__":
    main()
