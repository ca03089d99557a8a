"""train stage: DiT on the encoded latents with the paper's diffusion loss, AdamW and EMA.

Grain reads the ArrayRecord shards; the batch and the parameters live on a named (data, fsdp) mesh; Orbax
writes checkpoints (the EMA weights as their own item, so sampling restores only those). Every random draw
(posterior sample, timestep, noise, label dropout) comes from fold_in(seed, step), so a run is the same on
1 device or 8.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from stages.common import (Manifest, atomic_dir, fail, init_distributed, load_params, main_guard,
                           read_manifest, tree_sha256, write_json)

LATENTS, OUT, LOG = Path("artifacts/latents"), Path("artifacts/checkpoints"), Path("artifacts/logs/train.jsonl")


def model_config(cfg: dict, latents: dict):
    from dit.models import dit_config

    h, _, c = latents["latent_shape"]
    common = dict(input_size=h, in_channels=c, num_classes=latents["num_classes"],
                  learn_sigma=cfg["learn_sigma"], class_dropout_prob=cfg["class_dropout_prob"],
                  block=cfg["block"], dtype=cfg["dtype"])
    try:
        if cfg["model"]:
            return dit_config(cfg["model"], **common)
        return dit_config(None, depth=cfg["depth"], hidden_size=cfg["hidden_size"],
                          num_heads=cfg["num_heads"], patch_size=cfg["patch_size"], **common)
    except ValueError as e:
        fail(f"train.model: {e}")


def main(argv: list[str]) -> None:
    params = load_params("train", argv, __doc__)
    cfg = params["train"]
    for key in ("steps", "global_batch_size", "log_every", "ckpt_every"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            fail(f"train.{key}: expected a positive integer, got {cfg[key]!r}")
    if cfg["dtype"] not in ("float32", "bfloat16"):
        fail(f"train.dtype: expected float32 or bfloat16, got {cfg['dtype']!r}")
    latents = read_manifest(LATENTS)
    shards = [LATENTS / s["file"] for s in latents["shards"]]
    for s in shards:
        if not s.is_file():
            fail(f"artifacts/latents: shard {s.name} is missing; rerun the encode stage")
    if cfg["use_flips"] and not latents["flip"]:
        fail("train.use_flips: the latents were encoded without flips (encode.flip: false)")

    import jax
    import jax.numpy as jnp
    import optax

    from dit.diffusion import create_diffusion
    from dit.models import DiT, init_params
    from dit.sharding import batch_sharding, make_mesh, tree_shardings
    from stages import checkpoint
    from stages.loader import make_loader

    init_distributed()

    config = model_config(cfg, latents)
    try:
        mesh = make_mesh(cfg["mesh"]["data"], cfg["mesh"]["fsdp"])
    except ValueError as e:
        fail(str(e))
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg["global_batch_size"] % (n_batch * jax.process_count()):
        fail(f"train.global_batch_size: {cfg['global_batch_size']} is not divisible by the "
             f"{n_batch} batch shards")

    model = DiT(config)
    diffusion = create_diffusion(timestep_respacing="", learn_sigma=config.learn_sigma)
    tx = optax.adamw(cfg["lr"], b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg["weight_decay"])
    root = jax.random.key(params["seed"])
    train_key = jax.random.fold_in(jax.random.fold_in(root, cfg["seed"]), 1)
    init_key = jax.random.fold_in(jax.random.fold_in(root, cfg["seed"]), 0)
    scale = float(latents["scaling_factor"])

    abstract = jax.eval_shape(lambda k: init_params(config, k), init_key)
    p_shard = tree_shardings(mesh, abstract)
    o_shard = tree_shardings(mesh, jax.eval_shape(tx.init, abstract))
    state_shard = {"params": p_shard, "ema": p_shard, "opt_state": o_shard}
    x_shard = batch_sharding(mesh)

    def init_state(key):
        p = init_params(config, key)
        return {"params": p, "ema": p, "opt_state": tx.init(p)}

    init_state = jax.jit(init_state, out_shardings=state_shard)

    def loss_fn(p, batch, key):
        k_z, k_t, k_n, k_drop = jax.random.split(key, 4)
        mean, logvar = batch["mean"], batch["logvar"]
        z = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_z, mean.shape)) * scale
        t = jax.random.randint(k_t, (z.shape[0],), 0, diffusion.num_timesteps)
        noise = jax.random.normal(k_n, z.shape)

        def model_fn(x, tt):
            return model.apply({"params": p}, x, tt, batch["label"], train=True,
                               rngs={"dropout": k_drop})

        return diffusion.training_losses(model_fn, z, t, noise)["loss"].mean()

    def train_step(state, batch, step):
        key = jax.random.fold_in(train_key, step)
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = optax.apply_updates(state["params"], updates)
        d = cfg["ema_decay"]
        ema = jax.tree.map(lambda e, q: d * e + (1.0 - d) * q, state["ema"], new)
        return {"params": new, "ema": ema, "opt_state": opt_state}, loss

    train_step = jax.jit(train_step, in_shardings=(state_shard, x_shard, None),
                         out_shardings=(state_shard, None), donate_argnums=0)

    per_process = cfg["global_batch_size"] // jax.process_count()
    loader = make_loader(shards, per_process, seed=cfg["seed"], use_flips=cfg["use_flips"],
                         num_workers=cfg["num_workers"], process_index=jax.process_index(),
                         process_count=jax.process_count())

    manifest = Manifest("train", params)
    manifest.add_input("latents", LATENTS)
    # Every process writes its part of the Orbax checkpoints into one shared folder; process 0 alone
    # writes the log, model.json and the manifest.
    primary = jax.process_index() == 0
    LOG.parent.mkdir(parents=True, exist_ok=True)
    log_tmp = LOG.with_name(f".{LOG.name}.tmp")
    with atomic_dir(OUT, shared=True) as tmp, open(log_tmp if primary else os.devnull, "w") as log:
        mgr = checkpoint.manager(tmp, save_interval_steps=cfg["ckpt_every"], max_to_keep=3,
                                 create=True)
        state = init_state(init_key)
        it = iter(loader)
        t0 = time.time()
        compile_s, last, losses = None, t0, []
        for step in range(cfg["steps"]):
            host = next(it)
            batch = {k: jax.make_array_from_process_local_data(x_shard, host[k])
                     for k in ("mean", "logvar", "label")}
            state, loss = train_step(state, batch, step)
            losses.append(loss)
            if compile_s is None:
                jax.block_until_ready(loss)
                compile_s = time.time() - t0
                last = time.time()
                losses = []
                log.write(json.dumps({"step": 1, "loss": float(loss), "compile_s": round(compile_s, 3)}) + "\n")
            elif (step + 1) % cfg["log_every"] == 0 or step + 1 == cfg["steps"]:
                mean_loss = float(jnp.mean(jnp.stack(losses)))
                if not jnp.isfinite(mean_loss):
                    fail(f"train: loss became {mean_loss} by step {step + 1}; lower train.lr")
                now = time.time()
                img_s = len(losses) * cfg["global_batch_size"] / (now - last)
                log.write(json.dumps({"step": step + 1, "loss": round(mean_loss, 6),
                                      "img_per_s": round(img_s, 2)}) + "\n")
                log.flush()
                print(f"train: step {step + 1}/{cfg['steps']} loss {mean_loss:.4f} {img_s:.1f} img/s",
                      flush=True)
                last, losses = now, []
            checkpoint.save(mgr, step + 1, state, force=step + 1 == cfg["steps"])
        mgr.wait_until_finished()
        mgr.close()
        wall = time.time() - t0

        ema_sha256 = tree_sha256(state["ema"])  # a collective when the EMA is sharded over hosts
        if primary:
            write_json(tmp / "model.json", {
                "dit": dataclasses.asdict(config), "scaling_factor": scale,
                "classes": latents["classes"], "learn_sigma": config.learn_sigma,
                "diffusion_steps": diffusion.num_timesteps, "final_step": cfg["steps"]})
            manifest.counts = {"steps": cfg["steps"],
                               "images_seen": cfg["steps"] * cfg["global_batch_size"]}
            manifest.extra.update({
                "ema_sha256": ema_sha256,
                "final_step": cfg["steps"],
                "devices": jax.device_count(), "processes": jax.process_count(),
                "mesh": dict(mesh.shape),
                "compile_s": round(compile_s, 3),
                "steady_img_per_s": round((cfg["steps"] - 1) * cfg["global_batch_size"]
                                          / max(wall - compile_s, 1e-9), 2),
            })
            manifest.write(tmp)
    if primary:
        log_tmp.rename(LOG)
    print(f"train: {cfg['steps']} steps in {wall:.1f}s -> {OUT}")


if __name__ == "__main__":
    main_guard(main)
