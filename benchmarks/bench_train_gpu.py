"""Train-step throughput and MFU on one GPU: the train stage's own step against diffusers in PyTorch.

    python benchmarks/bench_train_gpu.py [--model DiT-XL/2] [--batch 128] [--steps 10] [--rounds 3]
                                         [--dtype bfloat16] [--sides ours-cudnn,ours-fused,ours-heads,peer,peer-compile]

Ours is `stages.runtime.train_step.make_step` exactly as the train stage compiles it: the diffusion loss (MSE + VB) on
latents drawn from stored posterior moments, AdamW, the EMA update, on params in float32 with the model's
compute in `--dtype`. Our sides differ only in the attention formulation (dit/attention.py): "cudnn"
(cuDNN's fused kernel, what attention_impl() picks on GPU), "fused" (jax.nn.dot_product_attention's
default, XLA's own attention) and "heads" (the CPU formulation), to check the per-backend choice on a GPU.

The peer is diffusers' DiTTransformer2DModel with the same loss (benchmarks/bench_train_step.peer_loss),
torch's fused AdamW and an EMA (torch._foreach_lerp_), as the official DiT train.py updates one every step,
under bfloat16 autocast (params float32) when --dtype is bfloat16; "peer-compile" adds torch.compile.

Each side runs in its own process (JAX and torch each hold GPU memory), compile or warm-up apart from the
steady state: `rounds` timed rounds of `steps` steps, synchronised on the device at each round's end; the
median round is reported. MFU = 2 x forward MACs per image (dit.flops) x 3 (forward + backward) x img/s /
the device's dense peak (stages.runtime.chips.CHIPS: 989 TFLOP/s bf16 on an H100 SXM).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

SIDES = ("ours-cudnn", "ours-fused", "ours-heads", "peer", "peer-compile")


def time_rounds(run, sync, rounds, steps):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run(steps)
        sync()
        times.append((time.perf_counter() - t0) / steps)
    return times


def side_ours(model_name, batch, dtype, rounds, steps):
    import jax
    import jax.numpy as jnp

    from dit.backend import step_compiler_options
    from dit.diffusion import create_diffusion
    from dit.models import DiT, dit_config, init_params
    from stages.runtime.train_step import make_optimizer, make_step

    cfg = dit_config(model_name, dtype=dtype)
    tx = make_optimizer({"lr": 1e-4, "weight_decay": 0.0, "grad_clip": None})
    step_fn = make_step(DiT(cfg), create_diffusion("", learn_sigma=cfg.learn_sigma), tx, 0.18215, 0.9999,
                        jax.random.key(1))
    params = init_params(cfg, jax.random.key(0))
    state = {"params": params, "ema": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params)}
    rng = np.random.default_rng(0)
    shape = (batch, cfg.input_size, cfg.input_size, cfg.in_channels)
    data = {"mean": jnp.asarray(rng.standard_normal(shape), jnp.float32),
            "logvar": jnp.asarray(rng.uniform(-6, -4, shape), jnp.float32),
            "label": jnp.asarray(rng.integers(0, cfg.num_classes, batch), jnp.int32)}
    t0 = time.perf_counter()
    compiled = jax.jit(step_fn, donate_argnums=(0,), compiler_options=step_compiler_options()).lower(
        state, data, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state, "i": 0, "m": None}

    def run(n):
        for _ in range(n):
            box["state"], box["m"] = compiled(box["state"], data, jnp.int32(box["i"]))
            box["i"] += 1

    run(2)
    jax.block_until_ready(box["m"])
    times = time_rounds(run, lambda: jax.block_until_ready(box["m"]), rounds, steps)
    return {"compile_s": compile_s, "times": times, "device": jax.devices()[0].device_kind,
            "version": f"jax {jax.__version__}", "loss": float(box["m"]["loss"])}


def side_peer(model_name, batch, dtype, rounds, steps, compile_):
    import torch

    from bench_train_step import peer_loss, peer_model
    from dit.models import dit_config

    torch.manual_seed(0)
    cfg = dit_config(model_name)
    model = peer_model(cfg).cuda()
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    fwd = torch.compile(model) if compile_ else model
    loss_fn = peer_loss(fwd, cfg.num_classes, device="cuda")
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device="cuda")
    amp = dtype == "bfloat16"
    box = {"loss": None}

    def run(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(x)
            loss.backward()
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1 - 0.9999)
            box["loss"] = loss

    t0 = time.perf_counter()
    run(3)  # warm-up (and torch.compile's compilation)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    times = time_rounds(run, torch.cuda.synchronize, rounds, steps)
    return {"compile_s": compile_s, "times": times, "device": torch.cuda.get_device_name(),
            "version": f"torch {torch.__version__}", "loss": float(box["loss"])}


def report(model_name, batch, dtype, results):
    from dit.flops import count_flops
    from dit.models import dit_config
    from stages.runtime.chips import peak_tflops

    macs = count_flops(dit_config(model_name))
    print(f"\n{model_name}, batch {batch}, compute {dtype} (params float32); forward {macs / 1e9:.1f} GMACs/image; "
          f"step = loss + backward + AdamW + EMA")
    for side, r in results.items():
        if "error" in r:
            print(f"  {side:14s} failed: {r['error']}")
            continue
        med = float(np.median(r["times"]))
        ips = batch / med
        peak = peak_tflops(r["device"], dtype, None)
        mfu = f"{100 * 6 * macs * ips / (peak * 1e12):.1f}%" if peak else "n/a"
        print(f"  {side:14s} {1000 * med:8.1f} ms/step  {ips:8.1f} img/s  MFU {mfu:>6s}  "
              f"(compile/warm-up {r['compile_s']:.1f} s; rounds {', '.join(f'{1000 * t:.1f}' for t in r['times'])} ms; "
              f"loss {r['loss']:.3f}; {r['device']}, {r['version']})")
    peer = results.get("peer", {})
    if "times" in peer:
        p = float(np.median(peer["times"]))
        for side, r in results.items():
            if "times" in r and side != "peer":
                print(f"  {side} / peer (img/s): {p / float(np.median(r['times'])):.2f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)  # internal: run one side, print JSON
    args = ap.parse_args(argv)
    common = (args.model, args.batch, args.dtype, args.rounds, args.steps)
    if args.side:
        if args.side.startswith("ours"):
            out = side_ours(*common)
        else:
            out = side_peer(*common, compile_=args.side == "peer-compile")
        print("RESULT " + json.dumps(out), flush=True)
        return
    from machine import describe

    print(describe(), flush=True)
    results = {}
    for side in args.sides.split(","):
        if side not in SIDES:
            ap.error(f"--sides: {side!r} is not one of {SIDES}")
        env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.9")
        if side.startswith("ours"):
            env["DIT_ATTENTION"] = side.split("-")[1]
        else:  # the peer imports dit (jax) for configs and diffusion tables: keep JAX off the GPU
            env.update(JAX_PLATFORMS="cpu", PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--model", args.model,
               "--batch", str(args.batch), "--dtype", args.dtype, "--steps", str(args.steps),
               "--rounds", str(args.rounds)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            results[side] = {"error": " | ".join(tail) or f"exit {proc.returncode}"}
        else:
            results[side] = json.loads(lines[-1][len("RESULT "):])
        print(f"{side}: done", flush=True)
    report(args.model, args.batch, args.dtype, results)


if __name__ == "__main__":
    main()
