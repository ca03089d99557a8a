"""Train-step throughput: our JAX DiT vs diffusers' PyTorch DiTTransformer2DModel, same run.

One step = forward + backward + AdamW update of DiT-S/2 on a batch of 32x32x4 latents with the DiT
diffusion loss (MSE + VB, learned-range variance). Both sides use the same shapes, loss and optimizer
settings (lr 1e-4, weight decay 0). Compile time of ours is reported apart from the steady state.

    python benchmarks/bench_train_step.py [--rows S2,default] [--rounds 5] [--steps 3] [--single-thread] [--profile] [--plain-memory]

Two rows: DiT-S/2 at batch 8 on 32x32x4 latents, and the embedded default's model (what `make repro`
trains: depth 4, hidden 128, 4 heads, patch 2, 8x8x4 latents, batch 64, 10 classes, learn_sigma).

The two sides are timed in alternating rounds (ours `steps` steps, then the peer's, `rounds` times)
so that load from other processes on a shared machine hits both alike; each round starts with `warmup`
untimed steps, so that neither side is timed while it recovers from the other's round (our first DiT-S/2
step after a torch round ran 1-7% slower than the next ones); the report gives each
side's median and best round in wall time and its median process CPU time per step.
Ours splits the batch over `train.cpu_devices` XLA:CPU devices (data parallel, parameters replicated), as the
train stage does on CPU, read from the row's params file (ROW_PARAMS: params.yaml for the embedded default,
1 device; params-imagenet.yaml for DiT-S/2, 2 devices); `--devices N` times every row on N devices.
--single-thread pins the process to one CPU before jax and torch start (XLA then sizes its thread pool to
one; torch gets 1 thread): a steadier comparison of the work each side does when other jobs share the
machine. (`--xla_cpu_multi_thread_eigen=false` and `--xla_cpu_use_thunk_runtime=false` no longer change
anything in the XLA of jax 0.10, so no XLA flags are set here.)

--profile also breaks each side's step down by op class (attention core, layer norms, adaLN modulation,
GELU, loss, AdamW, layout copies, ...): ours from XLA's own per-thunk trace (jax.profiler, the compiled
HLO's op_name metadata, which carries the flax module path and jax.named_scope names), the peer's from
torch.profiler's per-op self times.

Each row ends with the GEMM floor: every matmul of the linear layers in one step (forward y = xW,
backward dx = dy W^T and dW = x^T dy, for qkv, proj, fc1 and fc2 of every block), each timed on its own in
XLA and in torch, with its operands laid out as that side's step holds them (LAYOUTS; the earlier measure,
every product a plain (M, K) @ (K, N), is printed beside it). These are ~97% of the step's flops, so "peer step / our GEMM floor" bounds the ratio
ours could reach if everything else -- attention, norms, activations, AdamW -- cost nothing. Each side's
"overhead factor" is its step time over its own GEMM floor: 1.0 would be a step that is nothing but its
linear layers' matmuls, so comparing the two factors is fair on any CPU, whatever its GEMMs. The floor
is timed after every round (5 repeats a product) and its median reported; each round's ratio of the two
factors, from that round's steps and the floor timed right after them, is printed too, since this kind of
VM drifts by 10-30% within an hour and a floor timed minutes after the steps moved the ratio by as much.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe, params_cpu_devices, pin_to_one_cpu, stage_cpu_devices  # noqa: E402

import numpy as np  # noqa: E402


ROWS = {  # name -> (model name or field overrides, batch)
    "S2": ("DiT-S/2", 8),
    "default": (dict(input_size=8, depth=4, hidden_size=128, num_heads=4, patch_size=2, num_classes=10,
                     learn_sigma=True), 64),
}
# the params file whose train.cpu_devices a row's step runs on: the embedded default's model as `make repro`
# trains it; DiT-S/2 as the paper's configuration would train on CPU
ROW_PARAMS = {"S2": "params-imagenet.yaml", "default": "params.yaml"}


def row_config(spec):
    from dit.models import dit_config

    return dit_config(spec) if isinstance(spec, str) else dit_config(None, **spec)


def row_label(spec, batch):
    cfg = row_config(spec)
    name = spec if isinstance(spec, str) else (f"embedded default (depth {cfg.depth}, hidden {cfg.hidden_size}, "
                                               f"{cfg.num_heads} heads, patch {cfg.patch_size})")
    return f"{name}, batch {batch}, {cfg.input_size}x{cfg.input_size}x{cfg.in_channels} latents"


def setup_ours(spec, batch, devices=1, seed=0, step_memory=True):
    """Returns (compile seconds, run(n) -> seconds for n train steps, compiled HLO text). The batch is split
    over `devices` CPU devices, parameters replicated, compiled with the stage's options
    (dit.backend.step_compiler_options; `step_memory=False`: XLA's defaults): the train stage's
    data-parallel step on CPU."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from dit.backend import step_compiler_options
    from dit.diffusion import create_diffusion
    from dit.models import DiT, init_params
    from dit.sharding import BATCH_AXES, make_mesh

    cfg = row_config(spec)
    model = DiT(cfg)
    diffusion = create_diffusion("", learn_sigma=cfg.learn_sigma)
    opt = optax.adamw(1e-4, weight_decay=0.0)
    params = init_params(cfg, jax.random.key(seed))
    state = {"params": params, "opt": opt.init(params), "i": 0}

    def loss_fn(p, x, y, t, noise, key):
        def fn(xt, tt):
            with jax.named_scope("model"):  # scopes only name HLO ops for --profile; no effect on the maths
                return model.apply({"params": p}, xt, tt, y, train=True, rngs={"dropout": key})
        with jax.named_scope("loss"):
            return diffusion.training_losses(fn, x, t, noise)["loss"].mean()

    def step(p, s, x, y, key):
        k_t, k_n, k_d = jax.random.split(key, 3)
        t = jax.random.randint(k_t, (x.shape[0],), 0, diffusion.num_timesteps)
        noise = jax.random.normal(k_n, x.shape)
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y, t, noise, k_d)
        with jax.named_scope("adamw"):
            updates, s = opt.update(grads, s, p)
            return optax.apply_updates(p, updates), s, loss

    mesh = make_mesh(devices=jax.devices("cpu")[:devices])
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(BATCH_AXES))
    state["params"], state["opt"] = jax.device_put((state["params"], state["opt"]), rep)
    rng = np.random.default_rng(seed)
    x = jax.device_put(jnp.asarray(rng.standard_normal((batch, cfg.input_size, cfg.input_size, 4)), jnp.float32),
                       split)
    y = jax.device_put(jnp.asarray(rng.integers(0, cfg.num_classes, batch), jnp.int32), split)
    key = jax.random.key(seed)
    t0 = time.perf_counter()
    compiled = jax.jit(step, in_shardings=(rep, rep, split, split, None), out_shardings=(rep, rep, None),
                       donate_argnums=(0, 1), compiler_options=step_compiler_options("cpu") if step_memory else None,
                       ).lower(state["params"], state["opt"], x, y, key).compile()
    compile_s = time.perf_counter() - t0

    def run(n):
        """n steps, at most two in flight, as the train stage runs them (it reads step s-1's loss after
        dispatching step s): with more queued, XLA:CPU's gradient all-reduce over several devices can
        deadlock (README, under the params table)."""
        t0, c0 = time.perf_counter(), time.process_time()
        previous = None
        for _ in range(n):
            state["params"], state["opt"], loss = compiled(state["params"], state["opt"], x, y,
                                                           jax.random.fold_in(key, state["i"]))
            state["i"] += 1
            if previous is not None:
                jax.block_until_ready(previous)
            previous = loss
        jax.block_until_ready(loss)
        return time.perf_counter() - t0, time.process_time() - c0

    return compile_s, run, compiled.as_text()


def peer_loss(model, num_classes, device="cpu"):
    """x0 (N, C, H, W) -> the official training_losses (MSE + VB with frozen mean), written out in torch, NCHW,
    for a diffusers DiTTransformer2DModel on `device`."""
    import torch

    from dit.diffusion import create_diffusion

    d = create_diffusion("")
    tab = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32, device=device)
    sqrt_ac, sqrt_1m = tab(d.sqrt_alphas_cumprod), tab(d.sqrt_one_minus_alphas_cumprod)
    c1, c2 = tab(d.posterior_mean_coef1), tab(d.posterior_mean_coef2)
    plog, logb = tab(d.posterior_log_variance_clipped), tab(np.log(d.betas))
    r_ac, r_m1 = tab(d.sqrt_recip_alphas_cumprod), tab(d.sqrt_recipm1_alphas_cumprod)

    def loss_fn(x0):
        n = x0.shape[0]
        t = torch.randint(0, 1000, (n,), device=device)
        noise = torch.randn_like(x0)
        e = lambda a: a[t].view(n, 1, 1, 1)
        xt = e(sqrt_ac) * x0 + e(sqrt_1m) * noise
        out = model(xt, t, torch.randint(0, num_classes, (n,), device=device)).sample.float()
        eps, v = out[:, :4], out[:, 4:]
        frac = (v + 1) / 2
        logvar = frac * e(logb) + (1 - frac) * e(plog)
        px0 = e(r_ac) * xt - e(r_m1) * eps.detach()
        mean = e(c1) * px0 + e(c2) * xt
        tmean = e(c1) * x0 + e(c2) * xt
        kl = 0.5 * (-1 + logvar - e(plog) + torch.exp(e(plog) - logvar) + (tmean - mean) ** 2 * torch.exp(-logvar))
        vb = kl.mean(dim=(1, 2, 3)) / math.log(2.0)  # (the t == 0 decoder NLL is left out: same cost class)
        return (((noise - eps) ** 2).mean(dim=(1, 2, 3)) + vb).mean()

    return loss_fn


def peer_model(cfg):
    """diffusers' DiTTransformer2DModel of the same shape as DiT(cfg), in train mode, on the CPU."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        sample_size=cfg.input_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes,
        norm_eps=1e-6).train()


def setup_peer(spec, batch, seed=0):
    """diffusers' DiTTransformer2DModel + torch AdamW + the same loss; returns run(n) -> seconds."""
    import torch

    torch.manual_seed(seed)
    cfg = row_config(spec)
    model = peer_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    loss_fn = peer_loss(model, cfg.num_classes)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)

    def run(n):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            with torch.profiler.record_function("loss+model"):
                loss = loss_fn(x)
            loss.backward()
            with torch.profiler.record_function("adamw"):
                opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    return run, torch.get_num_threads()


def block_gemms(cfg, batch):
    """(M, K, N) of each linear layer's forward matmul in one block: qkv, proj, fc1, fc2."""
    m, d, h = batch * cfg.num_patches, cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    return [(m, k, n) for k, n in ((d, 3 * d), (d, d), (d, h), (h, d))]


# Each linear layer's three matmuls, with the operands laid out as each side's step holds them: ours keeps
# W as (in, out), so y = x W, dx = dy W^T and dW = x^T dy, the last with its left operand transposed
# (XLA:CPU gives YNNPACK no such GEMM and runs it on Eigen), or (dy^T x)^T in a layer that narrows, as
# dit.linear.weight_grad computes it; torch's nn.Linear keeps W as (out, in), so y = x W^T, dx = dy W and
# dW = dy^T x. "nn" is the earlier measure: every product fed as a plain (M, K) @ (K, N), operands
# pre-transposed, on both sides.
def _ours_dw(x, g):
    from dit.linear import weight_grad
    return weight_grad(x, g)


LAYOUTS = {
    "ours": (("x", "w", lambda x, w: x @ w), ("g", "w", lambda g, w: g @ w.T), ("x", "g", _ours_dw)),
    "peer": (("x", "wt", lambda x, w: x @ w.t()), ("g", "wt", lambda g, w: g @ w), ("g", "x", lambda g, x: g.t() @ x)),
}


def gemm_floor(spec, batch, repeats=9):
    """Seconds per step that the linear layers' matmuls alone take, each product timed alone, in XLA
    (ours) and torch (peer): {"ours", "peer"} in each side's own operand layouts (LAYOUTS), and
    {"ours nn", "peer nn"} with every product a plain (M, K) @ (K, N)."""
    import jax
    import torch

    cfg = row_config(spec)
    rng = np.random.default_rng(0)
    total = dict.fromkeys(("ours", "peer", "ours nn", "peer nn"), 0.0)

    def timed(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return cfg.depth * float(np.median(times))

    ours_fns = [(l, r, jax.jit(fn)) for l, r, fn in LAYOUTS["ours"]]
    mm = jax.jit(lambda p, q: p @ q)
    for m, k, n in block_gemms(cfg, batch):
        a = {"x": rng.standard_normal((m, k), np.float32), "g": rng.standard_normal((m, n), np.float32),
             "w": rng.standard_normal((k, n), np.float32)}
        a["wt"] = np.ascontiguousarray(a["w"].T)
        ours = {name: jax.device_put(v) for name, v in a.items()}
        peer = {name: torch.from_numpy(v) for name, v in a.items()}
        for l, r, jf in ours_fns:
            total["ours"] += timed(lambda: jf(ours[l], ours[r]).block_until_ready())
        for l, r, fn in LAYOUTS["peer"]:
            total["peer"] += timed(lambda: fn(peer[l], peer[r]))
        for p, q in (((m, k), (k, n)), ((m, n), (n, k)), ((k, m), (m, n))):  # y, dx, dW
            lhs, rhs = rng.standard_normal(p, np.float32), rng.standard_normal(q, np.float32)
            jl, jr, tl, tr = jax.device_put(lhs), jax.device_put(rhs), torch.from_numpy(lhs), torch.from_numpy(rhs)
            total["ours nn"] += timed(lambda: mm(jl, jr).block_until_ready())
            total["peer nn"] += timed(lambda: tl @ tr)
    return total


# -- op-class profile (--profile) -----------------------------------------------------------------

GAP = "between thunks (idle)"
CLASSES = ("GEMM (block linears)", "small linears (adaLN, embedders, final)", "attention core", "layer norms",
           "adaLN modulate + gates", "GELU", "loss", "AdamW", "layout copies", "other", GAP)


def _hlo_index(hlo_text):
    """instruction name -> (opcode, op_name metadata, whether it is or calls a dot)."""
    import re

    has_dot = {}
    for comp in re.split(r"\n(?=\S)", hlo_text):
        m = re.match(r"%?([\w.\-]+) ", comp)
        if m:
            has_dot[m.group(1)] = bool(re.search(r" dot\(", comp))
    index = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\((.*)$", hlo_text, re.M):
        name, opcode, rest = m.groups()
        op = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        index[name] = (opcode, op.group(1) if op else "",
                       opcode == "dot" or bool(calls and has_dot.get(calls.group(1))))
    return index


def classify_ours(opcode, op_name, is_dot):
    import re

    if "adamw" in op_name:
        return "AdamW"
    if "attention_core" in op_name:
        return "attention core"
    if "LayerNorm" in op_name or "layer_norm" in op_name:
        return "layer norms"
    if "modulate" in op_name:
        return "adaLN modulate + gates"
    if "gelu" in op_name:
        return "GELU"
    if is_dot and re.search(r"blocks_\d+/(attn/(qkv|proj)|mlp/fc[12])", op_name):
        return "GEMM (block linears)"
    if is_dot:
        return "small linears (adaLN, embedders, final)"
    if opcode in ("copy", "transpose"):
        return "layout copies"
    if "/model/" not in op_name and "loss" in op_name:
        return "loss"
    return "other"


def profile_ours(run, hlo_text, steps):
    """ms per step by op class: XLA's per-thunk trace, summed over the executor's threads. XLA:CPU runs an
    Eigen dot thunk (opcode dot, e.g. a GEMM with a transposed left operand, which YNNPACK does not take)
    asynchronously: its trace event covers the launch, and the GEMM shows as gaps before later thunks (the
    executor goes on with thunks that do not need its result). A gap within one execution is charged to the
    class of the last Eigen dot launched before it; gaps before any are counted apart (GAP)."""
    import collections
    import glob
    import tempfile

    import jax

    index = _hlo_index(hlo_text)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            run(steps)
        from tensorflow.tsl.profiler.protobuf import xplane_pb2  # the xplane proto ships with tensorflow

        space = xplane_pb2.XSpace()
        with open(glob.glob(d + "/**/*.xplane.pb", recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    total = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            events = sorted((ev for ev in line.events if plane.event_metadata[ev.metadata_id].name in index),
                            key=lambda ev: ev.offset_ps)  # one thread's thunks, `steps` executions in turn
            per_run = len(events) // steps if len(events) % steps == 0 else len(events)
            for i, ev in enumerate(events):
                name = plane.event_metadata[ev.metadata_id].name
                total[classify_ours(*index[name])] += ev.duration_ps / 1e9 / steps
                if i % per_run == 0:
                    last_dot = None  # a new execution
                if index[name][0] == "dot":
                    last_dot = name
                nxt = events[i + 1] if (i + 1) % per_run else None  # not across executions
                if nxt is not None:
                    gap = (nxt.offset_ps - ev.offset_ps - ev.duration_ps) / 1e9 / steps
                    total[classify_ours(*index[last_dot]) if last_dot else GAP] += max(gap, 0.0)
    return total


def classify_peer(name):
    n = name.lower()
    if "scaled_dot_product" in n or "flash_attention" in n or "attention" in n:
        return "attention core"
    if "layer_norm" in n:
        return "layer norms"
    if "gelu" in n:
        return "GELU"
    if n in ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear"):
        return "GEMM (all linears)"
    if n in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::permute", "aten::transpose", "aten::t",
             "aten::_unsafe_view", "aten::view", "aten::reshape", "aten::as_strided", "aten::expand",
             "aten::chunk", "aten::split", "aten::slice", "aten::select", "aten::unsqueeze", "aten::cat"):
        return "layout copies"
    return "elementwise + other (modulate, gates, residuals, loss, embedders)"


def profile_peer(run, steps):
    """ms per step by op class: torch.profiler self CPU time per aten op (the calling thread)."""
    import collections

    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(steps)
    total = collections.Counter()
    adam = 0.0
    for e in prof.key_averages():
        if e.key == "adamw":
            adam = e.cpu_time_total / 1e3 / steps
        if e.key in ("adamw", "loss+model") or e.key.startswith(("autograd::", "Optimizer.", "ProfilerStep")):
            continue
        total[classify_peer(e.key)] += e.self_cpu_time_total / 1e3 / steps
    # AdamW's foreach kernels are ordinary aten ops: move its whole region into its own class.
    total["elementwise + other (modulate, gates, residuals, loss, embedders)"] -= adam
    total["AdamW"] = adam
    return total


def print_profile(ours, peer):
    print("op-class profile, ms per step (ours: XLA thunk time summed over threads; "
          "peer: torch.profiler self CPU time):")
    keys = [k for k in CLASSES if k in ours] + [k for k in ours if k not in CLASSES]
    print(f"    {'ours':44s} {'ms':>8s}   {'peer':52s} {'ms':>8s}")
    peer_items = sorted(peer.items(), key=lambda kv: -kv[1])
    ours_items = [(k, ours[k]) for k in keys]
    for i in range(max(len(ours_items), len(peer_items))):
        a = ours_items[i] if i < len(ours_items) else ("", None)
        b = peer_items[i] if i < len(peer_items) else ("", None)
        fa = f"{a[1]:8.1f}" if a[1] is not None else " " * 8
        fb = f"{b[1]:8.1f}" if b[1] is not None else ""
        print(f"    {a[0]:44s} {fa}   {b[0]:52s} {fb}")
    print(f"    {'total':44s} {sum(ours.values()):8.1f}   {'total':52s} {sum(peer.values()):8.1f}")


def bench_row(spec, batch, rounds, steps, devices, profile=False, warmup=1, step_memory=True):
    print(f"\n== {row_label(spec, batch)}; fwd+bwd+AdamW; {rounds} rounds x {steps} steps per side", flush=True)
    compile_s, ours, hlo = setup_ours(spec, batch, devices, step_memory=step_memory)
    peer, threads = setup_peer(spec, batch)
    ours(1), peer(1)  # warm-up
    rounds_ = {"ours": [], "peer": []}
    round_floors = []  # the GEMM floor timed again after every round, so that both sides' steps and floors
    for _ in range(rounds):  # see the machine in the same state (this VM's speed drifts by 10-30% an hour)
        for name, run in (("ours", ours), ("peer", peer)):
            run(warmup)  # untimed: each side resumes after the other's round before it is timed
            wall, cpu = run(steps)
            rounds_[name].append((wall / steps, cpu / steps))
        round_floors.append(gemm_floor(spec, batch, repeats=5))
    med = lambda v: float(np.median(v))
    stats = {}
    split = f"batch split over {devices} XLA:CPU devices" if devices > 1 else "one XLA:CPU device"
    for name, label in (("ours", f"ours (JAX/Flax, jit, {split}; compile {compile_s:.1f} s)"),
                        ("peer", f"peer (diffusers DiTTransformer2DModel, PyTorch, {threads} threads)")):
        wall = [w for w, _ in rounds_[name]]
        cpu = [c for _, c in rounds_[name]]
        stats[name] = (med(wall), min(wall), med(cpu))
        print(f"{label}:\n    wall: median {batch / med(wall):.2f} img/s ({1000 * med(wall):.1f} ms/step), "
              f"best {batch / min(wall):.2f} img/s; CPU time {1000 * med(cpu):.1f} ms/step")
    (ow, ob, oc), (pw, pb, pc) = stats["ours"], stats["peer"]
    per_round = ", ".join(f"{p[0] / o[0]:.2f}" for o, p in zip(rounds_["ours"], rounds_["peer"]))
    print(f"ratio ours/peer (img/s): wall median {pw / ow:.2f}x, wall best {pb / ob:.2f}x, "
          f"CPU time {pc / oc:.2f}x; per round (wall) {per_round}")
    floors = {k: med([f[k] for f in round_floors]) for k in round_floors[0]}
    floor_ours, floor_peer = floors["ours"], floors["peer"]
    print(f"GEMM floor (linear-layer matmuls of one step, fwd+bwd, each timed alone, operands as each side's "
          f"step holds them; median of the floors timed after each round): ours {1000 * floor_ours:.1f} ms ({100 * floor_ours / ow:.0f}% of our step), peer "
          f"{1000 * floor_peer:.1f} ms ({100 * floor_peer / pw:.0f}% of its step); the highest ratio ours could "
          f"reach with everything else free: {pw / floor_ours:.2f}x")
    print(f"non-GEMM time (median step - own GEMM floor; the issue's 'everything but the matmuls'): "
          f"ours {1000 * (ow - floor_ours):.1f} ms, peer {1000 * (pw - floor_peer):.1f} ms; "
          f"ours/peer {(ow - floor_ours) / (pw - floor_peer):.2f}")
    fo, fp = ow / floor_ours, pw / floor_peer
    print(f"overhead factor (median step / own GEMM floor; 1.0 = nothing but the linears' matmuls): "
          f"ours {fo:.2f}, peer {fp:.2f}; ours/peer {fo / fp:.2f} (best-round steps: ours {ob / floor_ours:.2f}, "
          f"peer {pb / floor_peer:.2f})")
    per_round = [(o[0] / f["ours"]) / (p[0] / f["peer"])
                 for o, p, f in zip(rounds_["ours"], rounds_["peer"], round_floors)]
    print(f"  per round (each side's step over the floor timed right after it): ours/peer "
          f"{', '.join(f'{r:.2f}' for r in per_round)}; median {med(per_round):.2f}")
    no, np_ = floors["ours nn"], floors["peer nn"]
    print(f"  the same with every product a plain (M, K) @ (K, N) (the earlier measure): floor ours "
          f"{1000 * no:.1f} ms, peer {1000 * np_:.1f} ms; overhead factor ours {ow / no:.2f}, peer {pw / np_:.2f}; "
          f"ours/peer {(ow / no) / (pw / np_):.2f}")
    if profile:
        print_profile(profile_ours(ours, hlo, steps), profile_peer(peer, steps))
    return {"ours_ms": 1000 * ow, "peer_ms": 1000 * pw, "ratio": pw / ow, "overhead_ours": fo, "overhead_peer": fp,
            "overhead_nn_ours": ow / no, "overhead_nn_peer": pw / np_, "overhead_ratio_rounds": per_round,
            "non_gemm_ours_ms": 1000 * (ow - floor_ours), "non_gemm_peer_ms": 1000 * (pw - floor_peer)}


def main(argv=None):
    print(describe(), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="S2,default", help=f"comma-separated, from {sorted(ROWS)}")
    ap.add_argument("--model", default=None, help="replace the S2 row's model by this named config")
    ap.add_argument("--batch", type=int, default=None, help="replace the S2 row's batch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per round and side (x10 on the default row)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed steps each side runs at the start of every round (x10 on the default row)")
    ap.add_argument("--single-thread", action="store_true", help="one thread on each side")
    ap.add_argument("--profile", action="store_true", help="also print the op-class profile of both sides")
    ap.add_argument("--plain-memory", action="store_true",
                    help="ours without the stages' step memory settings (dit.backend: XLA's one temp block a "
                         "call, glibc's malloc defaults), for an A/B of them")
    ap.add_argument("--devices", type=int, default=None,
                    help="XLA:CPU devices ours splits every row's batch over (default: train.cpu_devices of the "
                         "row's params file, as the train stage runs on CPU; 1 = one device)")
    args = ap.parse_args(argv)
    if args.single_thread:  # before jax and torch are imported (they are imported lazily below)
        pin_to_one_cpu()
        import torch

        torch.set_num_threads(1)
    rows = args.rows.split(",")
    devices = {row: args.devices or params_cpu_devices("train", ROW_PARAMS[row]) for row in rows}
    stage_cpu_devices("train", max(devices.values()), not args.plain_memory)  # before any JAX work
    print(f"{os.cpu_count()} CPUs{', single thread' if args.single_thread else ''}; "
          f"both sides timed in alternating rounds", flush=True)
    print("(on a machine shared with other jobs, wall times swing with their load; CPU time per step "
          "is the steadier measure of the work each side does)")
    for row in rows:
        spec, batch = ROWS[row]
        if row == "S2":
            spec, batch = args.model or spec, args.batch or batch
        scale = 10 if row == "default" else 1
        bench_row(spec, batch, args.rounds, args.steps * scale, devices[row], args.profile, args.warmup * scale,
                  not args.plain_memory)


if __name__ == "__main__":
    main()
