"""The sample stage's sampler, shared with the curves stage and the TPU plan: the labels and keys of sample
i, the compiled chunk (one device's `sample.batch_size` samples: guided denoising, then the VAE decode), what a
chunk's bytes depend on (its fingerprint), and the paper's compute columns.

Sample i's label, initial noise and every step's noise derive from (seed, i) alone; a chunk is the
one-device program on a fixed shape, mapped over the devices with shard_map, so its bytes do not depend on
which device, host or run computed it (on one machine type).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from stages.runtime.common import cpu_model, fail, is_int, is_number, program_sha256

LABELS = ("balanced", "uniform")


def to_uint8(x):
    """[-1, 1] images to uint8 exactly as the official sample_ddp.py: clamp(127.5 x + 128)."""
    import jax.numpy as jnp

    return jnp.clip(127.5 * x + 128.0, 0, 255).astype(jnp.uint8)


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


def fingerprint(cfg: dict, seed: int, ema_sha256: str, vae_sha256: str, model_sha256: str, device,
                program_sha256: str, inputs_sha256: str) -> dict:
    """What a chunk's bytes depend on; num_samples and grid_per_class are not among them. The code enters
    as content, not as file bytes: `program_sha256` of the lowered one-device chunk (`chunk_sha256`) and
    `inputs_sha256` of the keys and labels it is fed (`chunk_inputs_sha256`), so a refactor or a moved file
    keeps the finished chunks, and a change to the sampler, the model or the label draw does not."""
    import jax

    keys = ("seed", "num_sampling_steps", "cfg_scale", "guided_channels", "batch_size", "batch_invariant",
            "labels", "classes")
    return {"root_seed": seed, **{f"sample.{k}": cfg[k] for k in keys}, "ema_sha256": ema_sha256,
            "vae_sha256": vae_sha256, "model_sha256": model_sha256, "program_sha256": program_sha256,
            "inputs_sha256": inputs_sha256, "jax": jax.__version__, "platform": device.platform,
            "machine": machine_kind(device)}


def chunk_program(model, vae, diffusion, cfg, scale, latent_shape):
    """One device's chunk: (EMA, VAE params, raw keys (B, 2), labels (B,)) -> uint8 images (B, H, W, 3).
    The weights are arguments, not closure constants: baked-in weights would be copied into the program
    (hundreds of MB of HLO for the SD VAE) and slow its compile. With `sample.batch_invariant` the chunk is
    made one sample at a time (lax.map of the one-sample program, denoising and decoding): every kernel then
    has one shape whatever `batch_size`, so the bytes do not depend on it either."""
    import jax
    import jax.numpy as jnp

    from dit.models import DiT

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

    return one_at_a_time if cfg["batch_invariant"] else chunk


def build_sampler(body, mesh):
    """jit(shard_map(`chunk_program`'s body)): (EMA, VAE params, raw keys (D*B, 2), labels (D*B,)) -> uint8
    images, one chunk per device of `mesh`."""
    import jax
    from jax.sharding import PartitionSpec as P

    from dit.sharding import BATCH_AXES

    rows = P(BATCH_AXES)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), rows, rows), out_specs=rows))


def chunk_sha256(body, ema, vae_params, per_device: int) -> str:
    """program_sha256 of the one-device chunk lowered on its own: no mesh, so the same on 1 device or 8."""
    import jax

    spec = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    lowered = jax.jit(body).lower(spec(ema), spec(vae_params), jax.ShapeDtypeStruct((per_device, 2), np.uint32),
                                  jax.ShapeDtypeStruct((per_device,), np.int32))
    return program_sha256(lowered)


def chunk_inputs_sha256(cfg: dict, root, num_classes: int) -> str:
    """sha256 of the raw keys and labels of chunk 0 (samples [0, batch_size)): the code that draws them
    (`_fold`, `sample_labels`) enters the chunks' fingerprint by what it gives."""
    idx = np.arange(cfg["batch_size"])
    return hashlib.sha256(_fold(root, idx).tobytes() + sample_labels(cfg, root, idx, num_classes).tobytes()).hexdigest()


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


