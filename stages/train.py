"""train stage: DiT on the encoded latents with the paper's diffusion loss, AdamW and EMA; resumable.

Orchestration only: check the inputs, resume or start (stages/runtime/checkpoint.py), then loop { batch, step, log,
maybe save } until train.steps, a stop signal (stages/runtime/preemption.py) or a non-finite loss. Grain reads one
global batch order fixed by the seed (stages/runtime/loader.py), each host its rows of it; the batch and the
parameters live on a named (data, fsdp) mesh. Every random draw (posterior sample, timestep, noise, label
dropout) comes from fold_in(seed, step) at the record's position in the global batch, so a run killed and
resumed, or made longer, ends with the bytes of an uninterrupted run on the same devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from stages.runtime.common import (Manifest, fail, init_distributed, load_params, lost_peer, main_guard,
                                  read_manifest, remove_debris, tree_sha256, write_json)
from stages.runtime.train_step import build, check_params, host_rows

LATENTS, CKPT, LOG = Path("artifacts/latents"), Path("artifacts/checkpoints"), Path("artifacts/logs/train.jsonl")


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
    from stages.runtime import checkpoint

    run = checkpoint.read_run(CKPT)
    steps = orbax_steps()
    if run is None:  # an older trainer's folder, or one copied in: what it was trained from is unknown
        return 0, (f"Orbax steps {steps[-3:]} without a run.json" if steps else None)
    if run.get("fingerprint") != fp:
        return 0, checkpoint.differences(run.get("identity", {}), ident, run.get("sources"))
    k = steps[-1] if steps else 0
    if k > cfg["steps"]:
        fail(f"train.steps: {cfg['steps']} is below step {k} already in {CKPT}/orbax; raise train.steps "
             f"or move the folder aside")
    return k, None


def room_for_save(mgr, kept, step: int, abstract_state: dict) -> None:
    """Before a save: the previous one finished without error (an asynchronous save that failed, say on a full
    disk, is named here, before another is started), and the disk has room for one more step of the size
    the last one took (and its kept EMA); when it has not, every host stops with the last complete checkpoint
    intact, saving nothing."""
    import jax

    from stages.runtime import checkpoint

    for m in (mgr, kept):
        if m is not None:
            m.wait_until_finished()
            m.check_for_errors()
    ok = True
    if jax.process_index() == 0 and checkpoint.space_checked():
        last = mgr.latest_step()
        need = (checkpoint.folder_bytes(CKPT / "orbax" / str(last)) if last is not None
                else checkpoint.tree_bytes(abstract_state))
        need += checkpoint.tree_bytes(abstract_state["ema"]) if kept is not None else 0
        free = checkpoint.free_bytes(CKPT)
        ok = free >= need
    if not checkpoint.agree(ok):
        fail(f"{CKPT}: no room for the checkpoint of step {step} (it needs about {checkpoint.gib(need)}, "
             f"{checkpoint.gib(free)} are free); stopped with the last complete one intact (step "
             f"{mgr.latest_step()}): free space and rerun to continue from it" if not ok else
             f"{CKPT}: process 0 found no room for the checkpoint of step {step}; stopped")


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
    from stages.runtime.loader import BadShard, check_shards, make_loader, open_records

    try:
        shards, counts = check_shards(LATENTS, latents)
    except BadShard as e:
        fail(str(e))
    records = open_records(shards, counts, cfg["use_flips"], latents["flip"])

    import jax
    from jax.experimental import multihost_utils

    from dit.backend import keep_step_memory, set_cpu_devices
    from dit.flops import count_flops
    from dit.sharding import make_mesh
    from stages.runtime import checkpoint
    from stages.runtime.loader import order_sha256
    from stages.runtime.preemption import Preemption
    from stages.runtime.chips import peak_tflops
    from stages.runtime.train_log import NonFinite, TrainLog

    set_cpu_devices(cfg["cpu_devices"])  # before any JAX work; only the CPU backend
    keep_step_memory()  # with the step's compile options: no fresh pages every step on CPU (dit/backend.py)
    init_distributed()
    try:
        mesh = make_mesh(cfg["mesh"]["data"], cfg["mesh"]["fsdp"])
    except ValueError as e:
        fail(str(e))
    B = cfg["global_batch_size"]
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    if B % n_batch:
        fail(f"train.global_batch_size: {B} is not divisible by the {n_batch} batch shards")
    scale = float(latents["scaling_factor"])
    setup = build(cfg, params["seed"], latents["latent_shape"], latents["num_classes"], scale, mesh)
    config, x_shard = setup.config, setup.x_shard
    try:
        lo, hi = host_rows(x_shard, B, jax.process_index())  # this host's rows of the global batch
    except ValueError as e:
        fail(f"train.mesh: {e}")
    only_unflipped = not cfg["use_flips"] and latents["flip"]

    # ----------------------------------------------------------------- resume or start (nothing written yet)
    manifest = Manifest("train", params)
    ident = checkpoint.identity(manifest.add_input("latents", LATENTS), params, setup.program_sha256(),
                                order_sha256(records, B, cfg["seed"], only_unflipped))
    init_from = None
    if cfg["init_from"] is not None:  # fine-tune a released checkpoint: its bytes are part of the run
        init_from = Path(str(cfg["init_from"])).expanduser()
        if not init_from.is_file():
            fail(f"train.init_from: '{init_from}' does not exist")
        ident["init_from_sha256"] = manifest.add_input("init_from", init_from)
    fp = checkpoint.fingerprint(ident)
    latest, aside = resume_point(cfg, fp, ident)
    start, state, meta, damaged = 0, None, None, []
    if latest:  # the newest step that restores and verifies; damaged ones are moved aside, named
        start, state, meta, damaged = checkpoint.restore_newest(CKPT, [k for k in orbax_steps() if k <= latest],
                                                                setup.abstract_state, fp)
        if not start:
            fail(f"{CKPT}/orbax: no step restores: all {len(damaged)} moved to {CKPT}.damaged/ with their reasons; "
                 "the next run starts afresh, unless an intact copy of a step is put back first")
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
            write_json(CKPT / "run.json", {"fingerprint": fp, "identity": ident, "sources": checkpoint.sources()})
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("train: checkpoint folder ready")

    if primary and checkpoint.space_checked():  # refuse a run whose checkpoints cannot fit
        need, (n_full, full), (n_kept, ema) = checkpoint.space_needed(CKPT, setup.abstract_state, start,
                                                                      cfg["steps"], cfg["keep_every"])
        if need > (free := checkpoint.free_bytes(CKPT)):
            fail(f"{CKPT}: the run's checkpoints need {checkpoint.gib(need)} more ({n_full} full states of "
                 f"{checkpoint.gib(full)}, {n_kept} kept EMAs of {checkpoint.gib(ema)}), {checkpoint.gib(free)} "
                 "are free; free space, raise train.keep_every or move the checkpoints to a larger disk")
    mgr, kept = checkpoint.writers(CKPT, cfg["keep_every"])
    window = None
    if start:
        window = meta["window"]
        print(f"train: resuming from step {start} of {cfg['steps']}")
    elif params0 is not None:
        state = jax.jit(lambda p: {"params": p, "ema": p, "opt_state": setup.tx.init(p)},
                        out_shardings=setup.state_shard)(jax.device_put(params0, setup.state_shard["params"]))
        print(f"train: starting from {init_from}")
    else:
        state = setup.jit_init()(setup.init_key)

    train_step = setup.jit_step()

    loader = make_loader(records, B, cfg["seed"], (lo, hi), start, only_unflipped, cfg["num_workers"])
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
                        room_for_save(mgr, None, step, setup.abstract_state)
                        checkpoint.save(mgr, None, step, state, {"fingerprint": fp, "window": log.window}, CKPT)
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
                    room_for_save(mgr, kept if keep else None, step, setup.abstract_state)
                    checkpoint.save(mgr, kept if keep else None, step, state,
                                    {"fingerprint": fp, "window": log.window}, CKPT)
    except jax.errors.JaxRuntimeError as e:
        lost_peer("train", e, f"the run resumes from its last complete checkpoint ({CKPT}/orbax)")
        raise  # one process, or a full disk: lost_peer returned
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
            "learn_sigma": config.learn_sigma, "diffusion_steps": setup.diffusion.num_timesteps,
            "final_step": cfg["steps"]})
        manifest.counts = {"steps": cfg["steps"], "images_seen": cfg["steps"] * B}
        steady = log.steady_img_per_s()
        manifest.extra.update({
            "ema_sha256": ema_sha256, "final_step": cfg["steps"], "resumed_from_step": start,
            "fingerprint": fp, "kept_ema_steps": kept.all_steps() if kept is not None else [],
            "damaged_steps": damaged,
            "devices": jax.device_count(), "processes": jax.process_count(), "mesh": dict(mesh.shape),
            "compile_s": round(log.compile_s, 3) if log.compile_s is not None else None,
            "steady_img_per_s": round(steady, 2) if steady else None, "mfu": log.mfu(steady),
        })
        manifest.write(CKPT)  # last: a folder with a manifest is a finished run
    print(f"train: steps {start}..{cfg['steps']} in {wall:.1f}s -> {CKPT}")


if __name__ == "__main__":
    main_guard(main)
