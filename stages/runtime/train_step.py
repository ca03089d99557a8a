"""The train step, built in one place for the train stage and for the TPU plan (stages/tools/plan.py).

`build` turns the train params and what the latents are (shape, classes, scaling factor) into the model,
the optimizer, the abstract state with its shardings on a mesh, and the pure step; `TrainSetup.jit_step` is
the jitted step the stage runs and the plan compiles for a topology, so the plan proves the program the
stage runs. `TrainSetup.program_sha256` lowers the init and the step on no mesh at all: the same text on 1
device or 256, a fingerprint of the computation rather than of the files that spell it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from stages.runtime.common import fail, is_int, is_number, program_sha256


def model_config(cfg: dict, latent_shape, num_classes: int):
    from dit.models import dit_config

    h, w, c = latent_shape
    common = dict(input_size=h, in_channels=c, num_classes=num_classes,
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
    for key in ("learn_sigma", "use_flips", "remat"):
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


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything the train step is made of, on one mesh."""

    config: Any  # dit.models.DiTConfig
    model: Any
    diffusion: Any
    tx: Any
    mesh: Any
    global_batch: int
    latent_shape: tuple
    init_key: Any
    step: Any  # the pure step (make_step)
    step_of: Any  # model -> the pure step with that model (program_sha256 lowers it without remat)
    state_shard: dict
    x_shard: Any
    abstract_state: dict  # ShapeDtypeStructs carrying state_shard

    def init_state(self, key):
        """{params, ema, opt_state} from the model's own init."""
        from dit.models import init_params

        p = init_params(self.config, key)
        return {"params": p, "ema": p, "opt_state": self.tx.init(p)}

    def jit_init(self):
        import jax

        return jax.jit(self.init_state, out_shardings=self.state_shard)

    def jit_step(self):
        """The step as the train stage runs it: sharded in and out, the state donated, the platform's compile
        options (dit.backend)."""
        import jax

        from dit.backend import step_compiler_options

        platform = self.mesh.devices.flat[0].platform
        return jax.jit(self.step, in_shardings=(self.state_shard, self.x_shard, None),
                       out_shardings=(self.state_shard, None), donate_argnums=0,
                       compiler_options=step_compiler_options(platform))

    def abstract_batch(self, sharded: bool = True) -> dict:
        import jax
        import jax.numpy as jnp

        s = {"sharding": self.x_shard} if sharded else {}
        shape = (self.global_batch, *self.latent_shape)
        return {"mean": jax.ShapeDtypeStruct(shape, jnp.float32, **s),
                "logvar": jax.ShapeDtypeStruct(shape, jnp.float32, **s),
                "label": jax.ShapeDtypeStruct((self.global_batch,), jnp.int32, **s)}

    def program_sha256(self) -> dict:
        """{init, step}: program_sha256 of the init and of the step's new state, lowered with no shardings and
        no remat (so the same on any mesh, with remat or without; the metrics' names are left out)."""
        import jax
        import jax.numpy as jnp

        from dit.models import DiT

        plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.abstract_state)
        init = jax.jit(self.init_state).lower(self.init_key)
        pure = self.step_of(DiT(self.config))  # remat changes where activations live, not the bytes (test)
        step = jax.jit(lambda s, b, i: pure(s, b, i)[0]).lower(
            plain, self.abstract_batch(sharded=False), jax.ShapeDtypeStruct((), jnp.int32))
        return {"init": program_sha256(init), "step": program_sha256(step)}


def host_rows(x_shard, global_batch: int, process_index: int) -> tuple[int, int]:
    """Rows [lo, hi) of the global batch that process `process_index`'s devices hold under `x_shard`: the rows
    the loader reads on that host. ValueError when they are not one contiguous range (a mesh whose batch axes
    interleave hosts), which the loader could not read."""
    index = x_shard.devices_indices_map((global_batch,))
    rows = sorted({(s[0].start or 0, s[0].stop or global_batch) for d, s in index.items()
                   if d.process_index == process_index})
    if not rows or any(a[1] != b[0] for a, b in zip(rows, rows[1:])):
        raise ValueError(f"process {process_index}'s rows of the global batch are not one range: {rows[:6]}")
    return rows[0][0], rows[-1][1]


def build(cfg: dict, seed: int, latent_shape, num_classes: int, scale: float, mesh) -> TrainSetup:
    """The train step of `cfg` (train.* params) for latents of `latent_shape` on `mesh`. `seed` is the root
    seed; keys are fold_in(fold_in(seed, train.seed), 0 for init, 1 for the steps)."""
    import jax

    from dit.diffusion import create_diffusion
    from dit.models import DiT
    from dit.sharding import batch_sharding, tree_shardings

    config = model_config(cfg, latent_shape, num_classes)
    model = DiT(config, remat=cfg["remat"])
    diffusion = create_diffusion(timestep_respacing="", learn_sigma=config.learn_sigma)
    tx = make_optimizer(cfg)
    root = jax.random.fold_in(jax.random.key(seed), cfg["seed"])
    init_key, train_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
    step_of = lambda m: make_step(m, diffusion, tx, scale, cfg["ema_decay"], train_key)  # noqa: E731
    setup = TrainSetup(config, model, diffusion, tx, mesh, cfg["global_batch_size"], tuple(latent_shape), init_key,
                       step_of(model), step_of, {}, None, {})
    abstract = jax.eval_shape(setup.init_state, init_key)
    p_shard = tree_shardings(mesh, abstract["params"])
    state_shard = {"params": p_shard, "ema": p_shard, "opt_state": tree_shardings(mesh, abstract["opt_state"])}
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  abstract, state_shard)
    return dataclasses.replace(setup, state_shard=state_shard, x_shard=batch_sharding(mesh),
                               abstract_state=abstract_state)
