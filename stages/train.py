"""train stage: DiT on the encoded latents with the paper's diffusion loss, AdamW and EMA; resumable.

Orchestration only: check the inputs, resume or start (stages/checkpoint.py), then loop { batch, step, log,
maybe save } until train.steps, a stop signal (stages/preemption.py) or a non-finite loss. Grain reads one
global batch order fixed by the seed (stages/loader.py), each host its rows of it; the batch and the
parameters live on a named (data, fsdp) mesh. Every random draw (posterior sample, timestep, noise, label
dropout) comes from fold_in(seed, step) at the record's position in the global batch, so a run killed and
resumed, or made longer, ends with the bytes of an uninterrupted run on the same devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from stages.common import (Manifest, fail, init_distributed, is_int, is_number, load_params, main_guard,
                           read_manifest, remove_debris, tree_sha256, write_json)

LATENTS, CKPT, LOG = Path("artifacts/latents"), Path("artifacts/checkpoints"), Path("artifacts/logs/train.jsonl")


def model_config(cfg: dict, latents: dict):
    from dit.models import dit_config

    h, w, c = latents["latent_shape"]
    common = dict(input_size=h, in_channels=c, num_classes=latents["num_classes"],
                  learn_sigma=cfg["learn_sigma"], class_dropout_prob=cfg["class_dropout_prob"],
                  block=cfg["block"], dtype=cfg["dtype"])
    try:
        if cfg["model"]:
            config = dit_config(cfg["model"], **common)
        else:
            config = dit_config(None, depth=cfg["depth"], hidden_size=cfg["hidden_size"],
                                num_heads=cfg["num_heads"], patch_size=cfg["patch_size"], **common)
    except ValueError as e:  # e.g. a patch size that does not divide the latents: name the param that set it
        field = (re.match(r"DiTConfig\.(\w+)", str(e)) or [None, None])[1]
        own = ("block", "class_dropout_prob", "dtype", "learn_sigma") + (
            () if cfg["model"] else ("depth", "hidden_size", "num_heads", "patch_size"))
        param = f"train.{field}" if field in own else "train.model" if cfg["model"] else "train"
        fail(f"{param}: {e} (artifacts/latents holds {h}x{w}x{c} latents)")
    if h != w or h % config.patch_size:
        fail(f"artifacts/latents: latents {h}x{w}x{c} do not fit the model: patch size {config.patch_size} "
             f"needs square latents with a side divisible by it (train.model / train.patch_size)")
    return config


def check_params(cfg: dict) -> None:
    for key in ("steps", "global_batch_size", "log_every", "ckpt_every", "cpu_devices"):
        if not is_int(cfg[key]):
            fail(f"train.{key}: expected a positive integer, got {cfg[key]!r}")
    keep = cfg["keep_every"]
    if keep is not None and not is_int(keep):
        fail(f"train.keep_every: expected null or a positive number of steps, got {keep!r}")
    for key, ok, want in (("lr", lambda v: v > 0, "a positive number"),
                          ("weight_decay", lambda v: v >= 0, "a number >= 0"),
                          ("ema_decay", lambda v: 0 <= v < 1, "a number in [0, 1)"),
                          ("class_dropout_prob", lambda v: 0 <= v < 1, "a number in [0, 1)")):
        if not (is_number(cfg[key]) and ok(cfg[key])):
            fail(f"train.{key}: expected {want}, got {cfg[key]!r}")
    for key in ("learn_sigma", "use_flips"):
        if not isinstance(cfg[key], bool):
            fail(f"train.{key}: expected true or false, got {cfg[key]!r}")
    if not is_int(cfg["seed"], 0, 2 ** 32):
        fail(f"train.seed: expected an integer in [0, 2**32), got {cfg['seed']!r}")
    if not is_int(cfg["num_workers"], 0):
        fail(f"train.num_workers: expected an integer >= 0, got {cfg['num_workers']!r}")
    for key in ("grad_clip", "peak_tflops"):
        if cfg[key] is not None and not (is_number(cfg[key]) and cfg[key] > 0):
            fail(f"train.{key}: expected null (off) or a positive number, got {cfg[key]!r}")
    if cfg["dtype"] not in ("float32", "bfloat16"):
        fail(f"train.dtype: expected float32 or bfloat16, got {cfg['dtype']!r}")
    if cfg["init_from"] is not None and (not isinstance(cfg["init_from"], str) or not cfg["init_from"]):
        fail(f"train.init_from: expected null or the path of an official DiT .pt, got {cfg['init_from']!r}")


def make_step(model, diffusion, tx, scale: float, ema_decay: float, train_key):
    """The pure train step: (state, global batch, step) -> (state, metrics). Keys: fold_in(key, step),
    then one draw per global batch position (threefry is partitionable, so the draws do not depend on
    how the batch is sharded)."""
    import jax
    import jax.numpy as jnp
    import optax

    def loss_fn(p, batch, key):
        k_z, k_t, k_n, k_drop = jax.random.split(key, 4)
        mean, logvar = batch["mean"], batch["logvar"]
        z = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_z, mean.shape)) * scale
        t = jax.random.randint(k_t, (z.shape[0],), 0, diffusion.num_timesteps)
        noise = jax.random.normal(k_n, z.shape)

        def model_fn(x, tt):
            return model.apply({"params": p}, x, tt, batch["label"], train=True, rngs={"dropout": k_drop})

        terms = diffusion.training_losses(model_fn, z, t, noise)
        return terms["loss"].mean(), {"mse": terms["mse"].mean(), "vb": terms["vb"].mean()}

    def train_step(state, batch, step):
        key = jax.random.fold_in(train_key, step)
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, q: ema_decay * e + (1.0 - ema_decay) * q, state["ema"], new)
        metrics = {"loss": loss, **terms, "grad_norm": optax.global_norm(grads)}
        return {"params": new, "ema": ema, "opt_state": opt_state}, metrics

    return train_step


def make_optimizer(cfg: dict):
    import optax

    tx = optax.adamw(cfg["lr"], b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg["weight_decay"])
    return optax.chain(optax.clip_by_global_norm(cfg["grad_clip"]), tx) if cfg["grad_clip"] else tx


def released_params(path: Path, config):
    """Our params from an official DiT .pt (torch.load weights_only=True), checked key by key against the
    config this run trains; any mismatch is one line naming the key."""
    import jax
    import jax.numpy as jnp

    from dit import convert

    try:
        sd, _ = convert.read_official_checkpoint(str(path))
        params = convert.official_to_params(sd, config)
    except ValueError as e:
        fail(f"train.init_from: {path} does not fit this model: {e}")
    return jax.tree.map(jnp.asarray, params)


def resume_point(cfg: dict, fp: str, ident: dict) -> tuple[int, str | None]:
    """(step to start from, why the folder must be moved aside or None). Reads only. Step 0 with no
    reason: a fresh start in a fresh folder, or in one a run left before its first checkpoint."""
    from stages import checkpoint

    run = checkpoint.read_run(CKPT)
    steps = orbax_steps()
    if run is None:  # an older trainer's folder, or one copied in: what it was trained from is unknown
        return 0, (f"Orbax steps {steps[-3:]} without a run.json" if steps else None)
    if run.get("fingerprint") != fp:
        return 0, checkpoint.differences(run.get("identity", {}), ident)
    k = steps[-1] if steps else 0
    if k > cfg["steps"]:
        fail(f"train.steps: {cfg['steps']} is below step {k} already in {CKPT}/orbax; raise train.steps "
             f"or move the folder aside")
    return k, None


def orbax_steps() -> list[int]:
    """Finished Orbax steps (Orbax writes a step under a tmp name and renames it when complete)."""
    d = CKPT / "orbax"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def main(argv: list[str]) -> None:
    params = load_params("train", argv, __doc__)
    cfg = params["train"]
    check_params(cfg)
    latents = read_manifest(LATENTS)
    if cfg["use_flips"] and not latents["flip"]:
        fail("train.use_flips: the latents were encoded without flips (encode.flip: false)")
    from stages.loader import BadShard, check_shards, make_loader, open_records

    try:
        shards, counts = check_shards(LATENTS, latents)
    except BadShard as e:
        fail(str(e))
    records = open_records(shards, counts, cfg["use_flips"], latents["flip"])

    import jax
    from jax.experimental import multihost_utils

    from dit.backend import keep_step_memory, set_cpu_devices, step_compiler_options
    from dit.diffusion import create_diffusion
    from dit.flops import count_flops
    from dit.models import DiT, init_params
    from dit.sharding import batch_sharding, make_mesh, tree_shardings
    from stages import checkpoint
    from stages.preemption import Preemption
    from stages.train_log import NonFinite, TrainLog, peak_tflops

    set_cpu_devices(cfg["cpu_devices"])  # before any JAX work; only the CPU backend
    keep_step_memory()  # with step_compiler_options: no fresh pages every step on CPU (dit/backend.py)
    init_distributed()
    config = model_config(cfg, latents)
    try:
        mesh = make_mesh(cfg["mesh"]["data"], cfg["mesh"]["fsdp"])
    except ValueError as e:
        fail(str(e))
    B = cfg["global_batch_size"]
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    if B % n_batch:
        fail(f"train.global_batch_size: {B} is not divisible by the {n_batch} batch shards")

    model = DiT(config)
    diffusion = create_diffusion(timestep_respacing="", learn_sigma=config.learn_sigma)
    tx = make_optimizer(cfg)
    root = jax.random.fold_in(jax.random.key(params["seed"]), cfg["seed"])
    init_key, train_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
    scale = float(latents["scaling_factor"])

    abstract = jax.eval_shape(lambda k: init_params(config, k), init_key)
    p_shard = tree_shardings(mesh, abstract)
    state_shard = {"params": p_shard, "ema": p_shard,
                   "opt_state": tree_shardings(mesh, jax.eval_shape(tx.init, abstract))}
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  jax.eval_shape(lambda k: {"params": (p := init_params(config, k)),
                                                            "ema": p, "opt_state": tx.init(p)}, init_key),
                                  state_shard)
    x_shard = batch_sharding(mesh)
    rows = sorted((s[0].start or 0, s[0].stop or B) for s in x_shard.addressable_devices_indices_map((B,)).values())
    lo, hi = rows[0][0], rows[-1][1]  # this host's rows of the global batch (its devices' shards)

    # ----------------------------------------------------------------- resume or start (nothing written yet)
    manifest = Manifest("train", params)
    ident = checkpoint.identity(manifest.add_input("latents", LATENTS), params)
    init_from = None
    if cfg["init_from"] is not None:  # fine-tune a released checkpoint: its bytes are part of the run
        init_from = Path(str(cfg["init_from"])).expanduser()
        if not init_from.is_file():
            fail(f"train.init_from: '{init_from}' does not exist")
        ident["init_from_sha256"] = manifest.add_input("init_from", init_from)
    fp = checkpoint.fingerprint(ident)
    start, aside = resume_point(cfg, fp, ident)
    if start:
        diff = checkpoint.check_fits(CKPT, start, abstract)
        if diff:
            fail(f"{CKPT}/orbax/{start}: {diff}: a checkpoint folder from another model config; move it aside")
        done = read_manifest(CKPT) if (CKPT / "manifest.json").is_file() else {}
        if start == cfg["steps"] and done.get("final_step") == start and done.get("fingerprint") == fp:
            print(f"train: {CKPT} already holds the finished run at step {start}; nothing to do")
            return
    # a fresh start from a released checkpoint: read and check it before the folder is touched
    params0 = released_params(init_from, config) if init_from is not None and not start else None
    primary = jax.process_index() == 0
    if jax.process_count() > 1:  # every host has read the folder before process 0 changes it
        multihost_utils.sync_global_devices("train: resume point decided")
    if primary:
        if aside:
            dest = checkpoint.move_aside(CKPT, LOG, (checkpoint.read_run(CKPT) or {}).get("fingerprint", ""))
            print(f"train: {CKPT} was trained from something else ({aside}); moved to {dest}, starting fresh")
        elif start == 0 and CKPT.exists():
            shutil.rmtree(CKPT)  # a run that died before its first checkpoint: nothing worth keeping
        remove_debris(CKPT)  # what dead trainers left beside the folder
        CKPT.mkdir(parents=True, exist_ok=True)
        for name in ("manifest.json", "model.json"):  # the folder is a run in progress until the end
            (CKPT / name).unlink(missing_ok=True)
        if start == 0:
            write_json(CKPT / "run.json", {"fingerprint": fp, "identity": ident})
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("train: checkpoint folder ready")

    mgr, kept = checkpoint.writers(CKPT, cfg["keep_every"])
    window = None
    if start:
        try:
            state, meta = checkpoint.restore(mgr, start, abstract_state)
        except Exception as e:  # a tree Orbax cannot map onto this run's state
            fail(f"{CKPT}/orbax/{start}: cannot restore into this run's state ({type(e).__name__}: "
                 f"{str(e).splitlines()[0] if str(e) else ''}); move the folder aside")
        if meta.get("fingerprint") != fp:
            fail(f"{CKPT}/orbax/{start}: its fingerprint differs from run.json's; move the folder aside")
        window = meta["window"]
        print(f"train: resuming from step {start} of {cfg['steps']}")
    elif params0 is not None:
        state = jax.jit(lambda p: {"params": p, "ema": p, "opt_state": tx.init(p)},
                        out_shardings=state_shard)(jax.device_put(params0, p_shard))
        print(f"train: starting from {init_from}")
    else:
        state = jax.jit(lambda k: {"params": (p := init_params(config, k)), "ema": p, "opt_state": tx.init(p)},
                        out_shardings=state_shard)(init_key)

    train_step = make_step(model, diffusion, tx, scale, cfg["ema_decay"], train_key)
    train_step = jax.jit(train_step, in_shardings=(state_shard, x_shard, None),
                         out_shardings=(state_shard, None), donate_argnums=0,
                         compiler_options=step_compiler_options())

    loader = make_loader(records, B, cfg["seed"], (lo, hi), start, not cfg["use_flips"] and latents["flip"],
                         cfg["num_workers"])
    devices = jax.devices()
    log = TrainLog(LOG, primary, start, cfg["steps"], cfg["log_every"], B, count_flops(config), devices=len(devices),
                   peak=None if devices[0].platform == "cpu" and not cfg["peak_tflops"] else
                   peak_tflops(devices[0].device_kind, cfg["dtype"], cfg["peak_tflops"]), window=window)
    stop = Preemption(multihost=jax.process_count() > 1)
    # Tests set DIT_TRAIN_RECORD_IDS to see which records each process read at each step.
    ids_path = os.environ.get("DIT_TRAIN_RECORD_IDS")
    ids_file = open(f"{ids_path}.{jax.process_index()}", "a") if ids_path else None
    step, t0 = start, time.time()
    try:
        while step < cfg["steps"]:
            if stop.should_stop(mgr, step):
                log.flush()
                mgr.wait_until_finished()
                if step not in mgr.all_steps():  # the signal may come right after a regular save of step
                    with log.paused():
                        checkpoint.save(mgr, None, step, state, {"fingerprint": fp, "window": log.window})
                    mgr.wait_until_finished()
                print(f"train: stopped by {stop.name} at step {step}; checkpoint saved, rerun to continue",
                      file=sys.stderr)
                sys.exit(stop.exit_code)
            host = next(loader)
            if ids_file:
                ids_file.write(json.dumps({"step": step + 1, "records": host["record"].tolist()}) + "\n")
            batch = {k: jax.make_array_from_process_local_data(x_shard, host[k], (B, *host[k].shape[1:]))
                     for k in ("mean", "logvar", "label")}
            state, metrics = train_step(state, batch, step)
            step += 1
            # reads step-1's metrics: at most two steps in flight. With many more queued, XLA:CPU's gradient
            # all-reduce over several devices deadlocks (jax 0.10.2; README, under the params table).
            log.step_done(step, metrics)
            keep = bool(cfg["keep_every"]) and step % cfg["keep_every"] == 0
            if step == cfg["steps"] or step % cfg["ckpt_every"] == 0 or keep:
                log.flush()  # a state is saved only once its loss was seen finite
                with log.paused():
                    checkpoint.save(mgr, kept if keep else None, step, state,
                                    {"fingerprint": fp, "window": log.window})
    except NonFinite as e:
        mgr.wait_until_finished()
        fail(f"train: non-finite loss at step {e.step} ({', '.join(f'{k} {v:.4g}' for k, v in e.values.items())}); "
             f"kept the last good checkpoint (step {mgr.latest_step()}); try a lower train.lr "
             f"(now {cfg['lr']}) or train.grad_clip (now {cfg['grad_clip']}, e.g. 1.0)")
    finally:
        log.close()
        if ids_file:
            ids_file.close()
        stop.restore()
    mgr.wait_until_finished()
    if kept is not None:
        kept.wait_until_finished()
    mgr.close()
    wall = time.time() - t0

    ema_sha256 = tree_sha256(state["ema"])  # a collective when the EMA is sharded over hosts
    if primary:
        write_json(CKPT / "model.json", {
            "dit": dataclasses.asdict(config), "scaling_factor": scale, "classes": latents["classes"],
            "learn_sigma": config.learn_sigma, "diffusion_steps": diffusion.num_timesteps,
            "final_step": cfg["steps"]})
        manifest.counts = {"steps": cfg["steps"], "images_seen": cfg["steps"] * B}
        steady = log.steady_img_per_s()
        manifest.extra.update({
            "ema_sha256": ema_sha256, "final_step": cfg["steps"], "resumed_from_step": start,
            "fingerprint": fp, "kept_ema_steps": kept.all_steps() if kept is not None else [],
            "devices": jax.device_count(), "processes": jax.process_count(), "mesh": dict(mesh.shape),
            "compile_s": round(log.compile_s, 3) if log.compile_s is not None else None,
            "steady_img_per_s": round(steady, 2) if steady else None, "mfu": log.mfu(steady),
        })
        manifest.write(CKPT)  # last: a folder with a manifest is a finished run
    print(f"train: steps {start}..{cfg['steps']} in {wall:.1f}s -> {CKPT}")


if __name__ == "__main__":
    main_guard(main)
