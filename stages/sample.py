"""sample stage: class-conditional samples from the EMA weights with classifier-free guidance.

Sample i's label, initial noise and every step's noise derive from (seed, i) alone. Samples are made in
chunks of `sample.batch_size` consecutive indices, one chunk per device per call, the call mapped over
the devices with shard_map: each device runs the one-device program on a fixed shape, so a chunk is the
same bytes whichever device, host or run computed it (on one machine type), and 1 device, 8 devices or
2 hosts write the same samples.npz. Each host writes the chunks its devices computed into a work folder
(`artifacts/.sample-work`), atomically and hashed; a rerun after a kill keeps the finished chunks. Process
0 then streams them into ADM's `samples.npz` (arr_0 uint8 NHWC, arr_1 labels) in index order; nothing is
gathered to every process.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from stages.runtime.common import (Manifest, atomic_dir, fail, init_distributed, is_int, load_params,
                                  lost_peer, main_guard, read_manifest, sha256_file, tree_sha256)
from stages.runtime.sample_chunks import ChunkStore, merge, num_chunks, plan
from stages.runtime.sampler import (build_sampler, check_params, chunk_inputs_sha256, chunk_program, chunk_sha256,
                                    cost, fingerprint, run_sampler)

CKPT, VAE, OUT = Path("artifacts/checkpoints"), Path("artifacts/vae"), Path("artifacts/samples")
WORK = Path("artifacts/.sample-work")
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
    check_params(cfg)
    ckpt_manifest = read_manifest(CKPT)
    read_manifest(VAE)
    info = json.loads((CKPT / "model.json").read_text())

    import jax
    from jax.experimental import multihost_utils
    from PIL import Image
    from tqdm import tqdm

    from dit import vae as vae_lib
    from dit.backend import set_cpu_devices
    from dit.diffusion import create_diffusion
    from dit.models import DiT, DiTConfig
    from dit.sharding import batch_sharding, make_mesh
    from stages.runtime import checkpoint

    set_cpu_devices(cfg["cpu_devices"])  # before any JAX work; only the CPU backend; bytes do not depend on it
    init_distributed()
    primary = jax.process_index() == 0

    config = DiTConfig(**info["dit"])
    check_params(cfg, config.num_classes)
    guided = cfg["guided_channels"]
    if guided is not None and not is_int(guided, 1, config.in_channels + 1):
        fail(f"sample.guided_channels: expected 1..{config.in_channels} or null, got {guided!r}")
    spacing = str(cfg["num_sampling_steps"])
    try:
        diffusion = create_diffusion(timestep_respacing=spacing, learn_sigma=config.learn_sigma)
    except (ValueError, KeyError) as e:
        fail(f"sample.num_sampling_steps: {e}")
    try:
        WORK.mkdir(parents=True, exist_ok=True)
        probe = WORK / f".probe.tmp{jax.process_index()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        fail(f"{WORK}: cannot write the sample work folder ({e.strerror})")

    mesh = make_mesh(-1, 1)
    step, ema = checkpoint.final_ema(CKPT, ckpt_manifest, config, mesh)
    ema_hash = tree_sha256(ema)
    if ema_hash != ckpt_manifest["ema_sha256"]:
        fail(f"{CKPT}/orbax/{step}: restored EMA weights hash {ema_hash[:12]} != the train manifest's "
             f"{ckpt_manifest['ema_sha256'][:12]}; the checkpoint was modified")
    try:
        vae_config, vae_params = vae_lib.load(str(VAE))
    except ValueError as e:  # missing weights, NaN or Inf in a parameter
        fail(f"{VAE}: {e}")
    vae = vae_lib.AutoencoderKL(vae_config)

    model = DiT(config)
    per_device, devices = cfg["batch_size"], mesh.size
    n = cfg["num_samples"]
    total = num_chunks(n, per_device)
    scale = float(info["scaling_factor"])
    h = config.input_size
    body = chunk_program(model, vae, diffusion, cfg, scale, (h, h, config.in_channels))
    sampler = build_sampler(body, mesh)
    root = jax.random.fold_in(jax.random.key(params["seed"]), cfg["seed"])

    manifest = Manifest("sample", params)
    manifest.add_input("checkpoints", CKPT)
    vae_hash = manifest.add_input("vae", VAE, exclude=("manifest.json",))
    store = ChunkStore(WORK)
    # Process 0 checks the work folder; every process then works from its answer.
    done_mask, problems = np.zeros(total, bool), []
    if primary:
        note = store.open(fingerprint(cfg, params["seed"], ema_hash, vae_hash, sha256_file(CKPT / "model.json"),
                                      jax.devices()[0], chunk_sha256(body, ema, vae_params, per_device),
                                      chunk_inputs_sha256(cfg, root, config.num_classes)))
        if note:
            print(note, flush=True)
        done, problems = store.scan(total)
        done_mask[done] = True
    if jax.process_count() > 1:
        done_mask = np.asarray(multihost_utils.broadcast_one_to_all(done_mask))
    pending = [k for k in range(total) if not done_mask[k]]
    steps = plan(pending, devices)

    shard = batch_sharding(mesh)
    compile_s = None
    if steps:  # compile before the loop, so the log tells compile time apart from sampling
        t = time.time()
        rows = jax.ShapeDtypeStruct((devices * per_device, 2), np.uint32, sharding=shard)
        labels_spec = jax.ShapeDtypeStruct((devices * per_device,), np.int32, sharding=shard)
        sampler = sampler.lower(ema, vae_params, rows, labels_spec).compile()
        compile_s = time.time() - t
    t0 = time.time()
    bar = tqdm(total=len(pending) * per_device, unit="img", desc="sample", disable=not primary,
               mininterval=2.0)
    try:
        for chunk_ids in steps:
            # dummy chunks pad the last step; their indices lie past every real chunk and are thrown away
            ids = [k if k is not None else total + j for j, k in enumerate(chunk_ids)]
            idx = np.concatenate([np.arange(k * per_device, (k + 1) * per_device) for k in ids])
            out, labels = run_sampler(sampler, ema, vae_params, root, cfg, idx, shard, config.num_classes)
            for s in out.addressable_shards:  # this host's devices' chunks only
                pos = (s.index[0].start or 0) // per_device
                if chunk_ids[pos] is not None:
                    lo = pos * per_device
                    store.write(chunk_ids[pos], np.asarray(s.data), labels[lo:lo + per_device])
            bar.update(sum(k is not None for k in chunk_ids) * per_device)
        bar.close()
        computed_s = time.time() - t0
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("sample chunks written")
    except jax.errors.JaxRuntimeError as e:
        lost_peer("sample", e, f"the finished chunks in {WORK} are reused")
        raise  # one process, or a full disk: lost_peer returned

    if primary:
        grid_images, grid_labels, shown = [], [], np.zeros(config.num_classes, int)

        def keep_for_grid(start, images, labels):  # the first grid_per_class samples of each class
            for img, y in zip(images, labels):
                if shown[y] < cfg["grid_per_class"]:
                    shown[y] += 1
                    grid_images.append(img)
                    grid_labels.append(y)

        with atomic_dir(OUT) as tmp:
            merge(store, n, per_device, tmp / "samples.npz", on_chunk=keep_for_grid)
            gi, gl = np.stack(grid_images), np.asarray(grid_labels)
            Image.fromarray(make_grid(gi, gl, config.num_classes, cfg["grid_per_class"])).save(
                tmp / "grid.png")
            manifest.counts = {"samples": n, "chunks": total, "chunks_reused": total - len(pending),
                               "chunks_computed": len(pending)}
            made = len(pending) * per_device
            manifest.extra.update({
                "checkpoint_step": int(step), "ema_sha256": ema_hash,
                "sampler": {"respacing": spacing, "kind": diffusion.sampler_kind,
                            "cfg_scale": cfg["cfg_scale"], "guided_channels": guided,
                            "labels": cfg["labels"], "per_device_batch": per_device,
                            "batch_invariant": cfg["batch_invariant"]},
                "chunks_recomputed": problems,
                "cost": cost(config, ckpt_manifest, diffusion.num_timesteps, cfg["cfg_scale"] > 1.0),
                "classes": info["classes"], "devices": jax.device_count(),
                "processes": jax.process_count(),
                "compile_s": round(compile_s, 3) if compile_s is not None else None,
                "img_per_s": round(made / computed_s, 2) if made and computed_s > 0 else None,
                "samples_sha256": sha256_file(tmp / "samples.npz"),
            })
            manifest.write(tmp)
    print(f"sample: {n} samples ({total - len(pending)} of {total} chunks reused) in "
          f"{time.time() - t0:.1f}s -> {OUT}")


if __name__ == "__main__":
    main_guard(main)
