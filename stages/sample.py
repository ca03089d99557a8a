"""sample stage: class-conditional samples from the EMA weights with classifier-free guidance.

Sample i has class i mod num_classes and its own key fold_in(seed, i): its initial noise and every step's
noise come from that key alone, so a sample does not depend on the batch size or the number of devices.
Batches are sharded over all devices (and hosts); the latents are decoded by the VAE and written in ADM's
format (`samples.npz`: arr_0 uint8 NHWC, arr_1 labels) with a grid of one row per class.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from stages.common import (Manifest, atomic_dir, fail, init_distributed, load_params, main_guard,
                           read_manifest, sha256_file, tree_sha256)

CKPT, VAE, OUT = Path("artifacts/checkpoints"), Path("artifacts/vae"), Path("artifacts/samples")


def to_uint8(x):
    """[-1, 1] images to uint8 exactly as the official sample_ddp.py: clamp(127.5 x + 128)."""
    import jax.numpy as jnp

    return jnp.clip(127.5 * x + 128.0, 0, 255).astype(jnp.uint8)


def make_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """One row per class: the first `per_class` samples of that class (blank where there are fewer)."""
    h, w = images.shape[1:3]
    zoom = max(1, math.ceil(64 / h))  # small images are hard to judge at 1:1
    pad = 2
    grid = np.full((num_classes * (h * zoom + pad) + pad, per_class * (w * zoom + pad) + pad, 3), 255,
                   np.uint8)
    for c in range(num_classes):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            tile = images[i].repeat(zoom, 0).repeat(zoom, 1)
            y, x = pad + c * (h * zoom + pad), pad + j * (w * zoom + pad)
            grid[y:y + h * zoom, x:x + w * zoom] = tile
    return grid


def main(argv: list[str]) -> None:
    params = load_params("sample", argv, __doc__)
    cfg = params["sample"]
    for key in ("num_samples", "batch_size", "grid_per_class"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            fail(f"sample.{key}: expected a positive integer, got {cfg[key]!r}")
    if not isinstance(cfg["cfg_scale"], (int, float)) or cfg["cfg_scale"] < 1.0:
        fail(f"sample.cfg_scale: expected a number >= 1, got {cfg['cfg_scale']!r}")
    ckpt_manifest = read_manifest(CKPT)
    read_manifest(VAE)
    info = json.loads((CKPT / "model.json").read_text())

    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from PIL import Image

    from dit import vae as vae_lib
    from dit.diffusion import create_diffusion
    from dit.models import DiT, DiTConfig
    from dit.sharding import batch_sharding, make_mesh
    from stages import checkpoint

    init_distributed()

    config = DiTConfig(**info["dit"])
    guided = cfg["guided_channels"]
    if guided is not None and not 1 <= guided <= config.in_channels:
        fail(f"sample.guided_channels: expected 1..{config.in_channels} or null, got {guided!r}")
    spacing = str(cfg["num_sampling_steps"])
    try:
        diffusion = create_diffusion(timestep_respacing=spacing, learn_sigma=config.learn_sigma)
    except (ValueError, KeyError) as e:
        fail(f"sample.num_sampling_steps: {e}")

    mgr = checkpoint.manager(CKPT)
    step = mgr.latest_step()
    if step is None:
        fail(f"{CKPT}/orbax: no checkpoint; rerun the train stage")
    mesh = make_mesh(-1, 1)
    ema = checkpoint.restore_ema(mgr, step, config, mesh)
    ema_hash = tree_sha256(ema)
    if step == ckpt_manifest["final_step"] and ema_hash != ckpt_manifest["ema_sha256"]:
        fail(f"{CKPT}: restored EMA weights hash {ema_hash[:12]} != manifest "
             f"{ckpt_manifest['ema_sha256'][:12]}; the checkpoint was modified")
    vae_config, vae_params = vae_lib.load(str(VAE))
    vae = vae_lib.AutoencoderKL(vae_config)

    model = DiT(config)
    n_dev = mesh.size
    batch = math.ceil(cfg["batch_size"] / n_dev) * n_dev
    shard = batch_sharding(mesh)
    scale = float(info["scaling_factor"])
    num_classes = config.num_classes
    use_cfg = cfg["cfg_scale"] > 1.0
    h = config.input_size
    latent_shape = (h, h, config.in_channels)

    def sample_batch(key_data, labels):
        keys = jax.random.wrap_key_data(key_data)
        if use_cfg:
            keys2 = jnp.concatenate([keys, keys])
            y = jnp.concatenate([labels, jnp.full_like(labels, num_classes)])

            def model_fn(x, t):
                return model.apply({"params": ema}, x, t, y, cfg["cfg_scale"], guided,
                                   method=DiT.forward_with_cfg)
        else:
            keys2, y = keys, labels

            def model_fn(x, t):
                return model.apply({"params": ema}, x, t, y)

        shape = (keys2.shape[0], *latent_shape)
        if spacing.startswith("ddim"):
            z = diffusion.ddim_sample_loop(model_fn, shape, keys2)
        else:
            z = diffusion.p_sample_loop(model_fn, shape, keys2)
        z = z[:keys.shape[0]] / scale
        x = vae.apply({"params": vae_params}, z, method=vae.decode)
        return to_uint8(x)

    sample_batch = jax.jit(sample_batch, in_shardings=(shard, shard), out_shardings=shard)

    n = cfg["num_samples"]
    root = jax.random.fold_in(jax.random.key(params["seed"]), cfg["seed"])
    # raw key data on the host: every process builds the same global arrays and keeps its own rows
    all_keys = np.asarray(jax.random.key_data(
        jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(n + batch))))
    all_labels = np.arange(n + batch, dtype=np.int32) % num_classes

    def put(host):
        return jax.make_array_from_callback(host.shape, shard, lambda idx: host[idx])


    manifest = Manifest("sample", params)
    manifest.add_input("checkpoints", CKPT)
    manifest.add_input("vae", VAE, exclude=("manifest.json",))
    images = None
    t0 = time.time()
    compile_s = None
    for start in range(0, n, batch):
        keys, labels = put(all_keys[start:start + batch]), put(all_labels[start:start + batch])
        out = multihost_utils.process_allgather(sample_batch(keys, labels), tiled=True)
        if compile_s is None:
            compile_s = time.time() - t0
        if images is None:
            images = np.zeros((n, *out.shape[1:]), np.uint8)
        stop = min(n, start + batch)
        images[start:stop] = out[:stop - start]
        print(f"sample: {stop}/{n}", flush=True)
    labels = all_labels[:n]
    wall = time.time() - t0

    if jax.process_index() == 0:
        with atomic_dir(OUT) as tmp:
            np.savez(tmp / "samples.npz", arr_0=images, arr_1=labels)
            grid = make_grid(images, labels, num_classes, cfg["grid_per_class"])
            Image.fromarray(grid).save(tmp / "grid.png")
            manifest.counts = {"samples": n}
            manifest.extra.update({
                "checkpoint_step": int(step), "ema_sha256": ema_hash,
                "sampler": {"respacing": spacing, "kind": "ddim" if spacing.startswith("ddim") else "ddpm",
                            "cfg_scale": cfg["cfg_scale"], "guided_channels": guided},
                "classes": info["classes"], "devices": jax.device_count(),
                "compile_plus_first_batch_s": round(compile_s, 3),
                "img_per_s": round(n / wall, 2),
                "samples_sha256": sha256_file(tmp / "samples.npz"),
            })
            manifest.write(tmp)
    print(f"sample: {n} samples in {wall:.1f}s -> {OUT}")


if __name__ == "__main__":
    main_guard(main)
