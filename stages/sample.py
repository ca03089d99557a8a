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

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from stages.common import (ROOT, Manifest, atomic_dir, cpu_model, fail, init_distributed, is_int, is_number,
                           load_params, main_guard, read_manifest, sha256_file, tree_sha256)
from stages.sample_chunks import ChunkStore, merge, num_chunks, plan

CKPT, VAE, OUT = Path("artifacts/checkpoints"), Path("artifacts/vae"), Path("artifacts/samples")
WORK = Path("artifacts/.sample-work")
LABELS = ("balanced", "uniform")
# the code whose change changes a chunk's bytes: finished chunks made by other code are not reused
RESULT_CODE = ("stages/sample.py", "dit/models.py", "dit/attention.py", "dit/linear.py", "dit/diffusion.py",
               "dit/vae.py")


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


def check_params(cfg: dict, num_classes: int | None = None) -> None:
    for key in ("num_samples", "batch_size", "grid_per_class", "cpu_devices"):
        if not is_int(cfg[key]):
            fail(f"sample.{key}: expected a positive integer, got {cfg[key]!r}")
    if not isinstance(cfg["batch_invariant"], bool):
        fail(f"sample.batch_invariant: expected true or false, got {cfg['batch_invariant']!r}")
    scale = cfg["cfg_scale"]
    if not is_number(scale) or scale < 1.0:
        fail(f"sample.cfg_scale: expected a finite number >= 1, got {scale!r}")
    seed = cfg["seed"]
    if not is_int(seed, 0, 2 ** 32):
        fail(f"sample.seed: expected an integer in [0, 2**32), got {seed!r}")
    if cfg["labels"] not in LABELS:
        fail(f"sample.labels: expected one of {', '.join(LABELS)}, got {cfg['labels']!r}")
    classes = cfg["classes"]
    if classes is not None:
        if not isinstance(classes, list) or not classes or not all(
                isinstance(c, int) and not isinstance(c, bool) for c in classes):
            fail(f"sample.classes: expected null or a non-empty list of class ids, got {classes!r}")
        if num_classes is not None and not all(0 <= c < num_classes for c in classes):
            bad = [c for c in classes if not 0 <= c < num_classes]
            fail(f"sample.classes: class ids {bad} are out of range 0..{num_classes - 1}")


def sample_labels(cfg: dict, root, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Labels of samples `indices`: i mod C (balanced) or uniform from the key fold_in(root, i) as DiT's
    sample_ddp.py draws them; over `sample.classes` when given."""
    import jax

    classes = np.asarray(cfg["classes"] if cfg["classes"] is not None else range(num_classes), np.int32)
    if cfg["labels"] == "balanced":
        return classes[indices % len(classes)]
    label_root = jax.random.fold_in(root, 0xFFFFFFFF)  # a stream apart from the noise keys
    pick = _uniform(label_root, indices, len(classes))
    return classes[pick]


def _fold(root, indices: np.ndarray) -> np.ndarray:
    import jax
    import jax.numpy as jnp

    return np.asarray(jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(root, i))(
        jnp.asarray(indices, jnp.uint32))))


def _uniform(root, indices: np.ndarray, n: int) -> np.ndarray:
    import jax

    keys = jax.random.wrap_key_data(_fold(root, indices))
    return np.asarray(jax.vmap(lambda k: jax.random.randint(k, (), 0, n))(keys))


def run_sampler(sampler, ema, vae_params, root, cfg: dict, idx: np.ndarray, shard, num_classes: int):
    """(images, labels) of samples `idx`: their keys and labels from (root, i), placed by `shard`, through
    `build_sampler`'s program. `images` is a global array (each host holds its devices' rows)."""
    import jax

    key_data, labels = _fold(root, idx), sample_labels(cfg, root, idx, num_classes)
    put = lambda host: jax.make_array_from_callback(host.shape, shard, lambda i: host[i])
    return sampler(ema, vae_params, put(key_data), put(labels)), labels


def machine_kind(device) -> str:
    """What a chunk's bytes depend on beyond the code and inputs: a GPU's or TPU's kind, or on CPU the
    processor (cpu_model: its ISA picks XLA's kernels) and the cores XLA's thread pool is sized by (the
    Eigen convolutions of the VAE decode split their sums by it). Not the device count: a chunk is one
    device's."""
    if device.platform != "cpu":
        return device.device_kind
    affinity = getattr(os, "sched_getaffinity", None)
    return f"{cpu_model()}; {len(affinity(0)) if affinity else os.cpu_count()} cores"


def fingerprint(cfg: dict, seed: int, ema_sha256: str, vae_sha256: str, model_sha256: str, device) -> dict:
    """What a chunk's bytes depend on; num_samples and grid_per_class are not among them."""
    import jax

    code = hashlib.sha256()
    for rel in RESULT_CODE:
        code.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes())
    keys = ("seed", "num_sampling_steps", "cfg_scale", "guided_channels", "batch_size", "batch_invariant",
            "labels", "classes")
    return {"root_seed": seed, **{f"sample.{k}": cfg[k] for k in keys}, "ema_sha256": ema_sha256,
            "vae_sha256": vae_sha256, "model_sha256": model_sha256, "code_sha256": code.hexdigest(),
            "jax": jax.__version__, "platform": device.platform, "machine": machine_kind(device)}


def build_sampler(model, vae, diffusion, cfg, scale, latent_shape, mesh):
    """jit(shard_map(one device's chunk)): (EMA, VAE params, raw keys (D*B, 2), labels (D*B,)) -> uint8
    images. The weights are arguments, not closure constants: baked-in weights would be copied into the
    program (hundreds of MB of HLO for the SD VAE) and slow its compile. With `sample.batch_invariant` a
    device runs its chunk one sample at a time (lax.map of the one-sample program, denoising and decoding):
    every kernel then has one shape whatever `batch_size`, so the bytes do not depend on it either."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from dit.models import DiT
    from dit.sharding import BATCH_AXES

    num_classes = model.config.num_classes
    use_cfg = cfg["cfg_scale"] > 1.0
    guided = cfg["guided_channels"]

    def chunk(ema, vae_params, key_data, labels):
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

        z = diffusion.sample_loop(model_fn, (keys2.shape[0], *latent_shape), keys2)
        z = z[:keys.shape[0]] / scale
        return to_uint8(vae.apply({"params": vae_params}, z, method=vae.decode))

    def one_at_a_time(ema, vae_params, key_data, labels):
        def one(args):
            k, y = args
            return chunk(ema, vae_params, k[None], y[None])[0]

        return jax.lax.map(one, (key_data, labels))

    rows = P(BATCH_AXES)
    body = one_at_a_time if cfg["batch_invariant"] else chunk
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), rows, rows), out_specs=rows))


def cost(config, ckpt_manifest: dict, sampling_steps: int, guided: bool) -> dict:
    """The paper's compute columns: model Gflops (multiply-add = 1) at the latent size trained, training
    compute = Gflops x 3 (forward + backward) x batch x steps, sampling Gflops per image = Gflops x
    steps x 2 with guidance (a conditional and an unconditional pass)."""
    from dit.flops import count_flops, count_params

    gflops = count_flops(config) / 1e9
    train = ckpt_manifest.get("params", {}).get("train", {})
    batch, steps = train.get("global_batch_size"), ckpt_manifest.get("final_step")
    return {"params": count_params(config), "gflops": gflops,
            "train_gflops": gflops * 3 * batch * steps if batch and steps else None,
            "sample_gflops_per_image": gflops * sampling_steps * (2 if guided else 1)}


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
    from stages import checkpoint

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

    mgr = checkpoint.manager(CKPT)
    step = mgr.latest_step()
    if step is None:
        fail(f"{CKPT}/orbax: no checkpoint; rerun the train stage")
    mesh = make_mesh(-1, 1)
    try:
        ema = checkpoint.restore_ema(mgr, step, config, mesh)
    except Exception as e:  # a checkpoint without the `ema` item, or of another model
        fail(f"{CKPT}/orbax step {step}: cannot restore EMA weights ({type(e).__name__}: "
             f"{str(e).splitlines()[0][:200] if str(e) else ''})")
    ema_hash = tree_sha256(ema)
    if step == ckpt_manifest["final_step"] and ema_hash != ckpt_manifest["ema_sha256"]:
        fail(f"{CKPT}: restored EMA weights hash {ema_hash[:12]} != manifest "
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
    sampler = build_sampler(model, vae, diffusion, cfg, scale, (h, h, config.in_channels), mesh)
    root = jax.random.fold_in(jax.random.key(params["seed"]), cfg["seed"])

    manifest = Manifest("sample", params)
    manifest.add_input("checkpoints", CKPT)
    vae_hash = manifest.add_input("vae", VAE, exclude=("manifest.json",))
    store = ChunkStore(WORK)
    # Process 0 checks the work folder; every process then works from its answer.
    done_mask, problems = np.zeros(total, bool), []
    if primary:
        note = store.open(fingerprint(cfg, params["seed"], ema_hash, vae_hash, sha256_file(CKPT / "model.json"),
                                      jax.devices()[0]))
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
