"""The run and sample-chunk fingerprints hash what the code computes, not the files that spell it: a comment,
a renamed function or a moved helper keeps a run resuming and finished chunks reused; a changed loss or
sampler does not. Each variant of the code is a copy of the project in which a subprocess computes both
program hashes."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from test_train_inputs import records_of
from test_train_sample import latents  # noqa: F401  (the module fixture)

pytestmark = pytest.mark.slow  # programs lowered in subprocesses, train steps

PROBE = """
import json, sys
import jax, yaml
from dit import vae as vae_lib
from dit.diffusion import create_diffusion
from dit.sharding import make_mesh
from stages.runtime.sampler import chunk_program, chunk_sha256
from stages.runtime.train_step import build

params = yaml.safe_load(open("params.yaml"))
mesh = make_mesh(-1, 1)
setup = build(params["train"], params["seed"], (8, 8, 4), 10, 0.5, mesh)
cfg = params["sample"]
vae = vae_lib.AutoencoderKL(vae_lib.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
                                              norm_num_groups=4))
vae_params = jax.eval_shape(lambda k: vae.init(k, jax.numpy.zeros((1, 16, 16, 3)), k)["params"], jax.random.key(0))
body = chunk_program(setup.model, vae, create_diffusion("4", learn_sigma=True), cfg, 0.5, (8, 8, 4))
ema = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), setup.abstract_state["ema"])
print(json.dumps({**setup.program_sha256(), "chunk": chunk_sha256(body, ema, vae_params, 4),
                  "devices": len(jax.devices())}))
"""


def variant(tmp_path, name, edits=()):
    """A copy of the project's code with `edits` (path, old, new) applied; returns its program hashes."""
    dst = tmp_path / name
    for d in ("stages", "dit", "pipelines", "metrics"):
        shutil.copytree(ROOT / d, dst / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / f, dst / f)
    for path, old, new in edits:
        text = (dst / path).read_text()
        assert old in text, (path, old)
        (dst / path).write_text(text.replace(old, new))
    return dst


def hashes(dst, devices=1):
    env = {**os.environ, "PYTHONPATH": str(dst), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=dst, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_refactor_keeps_the_fingerprints_and_a_changed_computation_does_not(tmp_path):
    base = hashes(variant(tmp_path, "base"))
    assert set(base) == {"init", "step", "chunk", "devices"} and len(base["step"]) == 64
    # a comment, a renamed inner function, a helper moved to a module of its own, on 4 devices
    refactor = variant(tmp_path, "refactor", [
        ("stages/train.py", '"""train stage:', '# a comment\n"""train stage:'),
        ("stages/runtime/train_step.py", "def loss_fn(p, batch, key):", "def diffusion_loss(p, batch, key):"),
        ("stages/runtime/train_step.py", "jax.value_and_grad(loss_fn,", "jax.value_and_grad(diffusion_loss,"),
        ("stages/runtime/train_step.py", "def make_optimizer(cfg: dict):", "def _moved(cfg: dict):"),
        ("stages/runtime/train_step.py", "from stages.runtime.common import",
         "from stages.runtime.optimizer import make_optimizer\nfrom stages.runtime.common import"),
        ("stages/runtime/sampler.py", "def one_at_a_time(", "def sample_by_sample("),
        ("stages/runtime/sampler.py", "return one_at_a_time if", "return sample_by_sample if"),
        ("dit/models.py", "\nclass ", "\n# a note on the model\nclass "),
    ])
    (refactor / "stages/runtime/optimizer.py").write_text(
        "def make_optimizer(cfg: dict):\n    import optax\n\n"
        "    tx = optax.adamw(cfg['lr'], b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg['weight_decay'])\n"
        "    return optax.chain(optax.clip_by_global_norm(cfg['grad_clip']), tx) if cfg['grad_clip'] else tx\n")
    moved = hashes(refactor, devices=4)
    assert moved["devices"] == 4 and {k: moved[k] for k in ("init", "step", "chunk")} == \
        {k: base[k] for k in ("init", "step", "chunk")}
    # the loss weights VB twice: the step changes, the init and the sampler do not
    loss = hashes(variant(tmp_path, "loss", [
        ("stages/runtime/train_step.py", 'return terms["loss"].mean(),', 'return (terms["mse"] + 2 * terms["vb"]).mean(),')]))
    assert loss["step"] != base["step"] and loss["init"] == base["init"] and loss["chunk"] == base["chunk"]
    # guidance on all channels instead of the first 3: the chunk changes, training does not
    guided = hashes(variant(tmp_path, "guided", [("params.yaml", "guided_channels: 3", "guided_channels: null")]))
    assert guided["chunk"] != base["chunk"] and guided["step"] == base["step"]


def test_the_data_order_hash_follows_the_order_and_the_decoding(latents):
    from stages.runtime import loader

    records = records_of(latents)
    a = loader.order_sha256(records, 16, 2, True)
    assert a == loader.order_sha256(records_of(latents), 16, 2, True)  # the same read twice
    assert a != loader.order_sha256(records, 16, 3, True)  # another seed: another order
    assert a != loader.order_sha256(records, 8, 2, True)  # another batch size
    assert a != loader.order_sha256(records_of(latents, use_flips=True), 16, 2, False)  # flips in the pool
    real = loader.decode_batch
    try:  # decoding that rounds the latents differently is another input to the step
        loader.decode_batch = lambda datas: {**(r := real(datas)), "mean": np.round(r["mean"], 2)}
        assert a != loader.order_sha256(records, 16, 2, True)
    finally:
        loader.decode_batch = real


def test_remat_gives_the_same_bytes_and_keeps_the_fingerprint():
    """train.remat (jax.checkpoint per block) recomputes the forward pass in the backward one: three train
    steps give the same parameter bytes with it on and off, so it is result-neutral, like the mesh: the
    run fingerprint ignores it (program_sha256 lowers the step without remat) and a run may turn it on to
    fit a smaller slice and keep its checkpoints."""
    import jax
    import jax.numpy as jnp
    import yaml

    from dit.sharding import make_mesh
    from stages.runtime.checkpoint import RESULT_NEUTRAL
    from stages.runtime.train_step import build

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    got, programs, texts = {}, {}, {}
    for remat in (False, True):
        setup = build({**params["train"], "remat": remat, "depth": 2}, 0, (8, 8, 4), 10, 0.5, make_mesh(-1, 1))
        assert setup.model.remat is remat
        state, step, rng = setup.jit_init()(setup.init_key), setup.jit_step(), np.random.default_rng(0)
        for s in range(3):
            batch = {"mean": jnp.asarray(rng.normal(size=(64, 8, 8, 4)), jnp.float32),
                     "logvar": jnp.asarray(rng.normal(size=(64, 8, 8, 4)) - 3, jnp.float32),
                     "label": jnp.asarray(rng.integers(0, 10, 64), jnp.int32)}
            state, _ = step(state, batch, s)
        got[remat] = jax.device_get(state)
        programs[remat] = setup.program_sha256()
        texts[remat] = step.lower(setup.abstract_state, setup.abstract_batch(),
                                  jax.ShapeDtypeStruct((), jnp.int32)).as_text()
    assert texts[False] != texts[True]  # remat did make another program
    for a, b in zip(jax.tree.leaves(got[False]), jax.tree.leaves(got[True])):
        np.testing.assert_array_equal(a, b)
    assert programs[False] == programs[True] and "remat" in RESULT_NEUTRAL
