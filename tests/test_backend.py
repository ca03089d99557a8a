"""dit.backend's step settings: XLA:CPU's temporaries split into blocks that malloc keeps
(step_compiler_options + keep_step_memory), so a train step stops paying for ~its whole activation memory
in fresh, zero-filled pages every call. Where buffers live changes; the maths does not: the same bytes."""

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # twelve train steps of a DiT-S-sized model

# Twelve train steps (stages.runtime.train_step.make_step: DiT loss, AdamW, EMA) of a small DiT whose temporaries
# (~280 MB) are well over one block; prints the state's sha256 and the minor page faults of each step
# after the first.
STEPS = """
import hashlib, json, resource, sys
import jax, jax.numpy as jnp, numpy as np
from dit import backend
from dit.diffusion import create_diffusion
from dit.models import DiT, dit_config, init_params
from stages.runtime.train_step import make_optimizer, make_step
options = {"none": None, "project": backend.step_compiler_options("cpu"),
           "1MB": {"xla_multiheap_size_constraint_per_heap": 1 << 20}}[sys.argv[1]]
if sys.argv[1] == "project":
    assert backend.keep_step_memory()  # glibc on Linux: the mallopt calls were taken
cfg = dit_config(None, input_size=16, depth=2, hidden_size=256, num_heads=4, patch_size=2, num_classes=10)
tx = make_optimizer({"lr": 1e-4, "weight_decay": 0.0, "grad_clip": None})
p = init_params(cfg, jax.random.key(0))
state = {"params": p, "ema": jax.tree.map(jnp.copy, p), "opt_state": tx.init(p)}
rng = np.random.default_rng(0)
batch = {"mean": jnp.asarray(rng.standard_normal((64, 16, 16, 4)), jnp.float32),
         "logvar": jnp.full((64, 16, 16, 4), -4.0), "label": jnp.arange(64, dtype=jnp.int32) % 10}
step = jax.jit(make_step(DiT(cfg), create_diffusion("", learn_sigma=True), tx, 0.18215, 0.9999,
                         jax.random.key(1)), donate_argnums=0, compiler_options=options)
faults = []
for i in range(12):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, _ = step(state, batch, i)
    jax.block_until_ready(state)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
sha = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(state))).hexdigest()
print(json.dumps({"sha": sha, "faults": faults[1:]}))
"""


def run_steps(options: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = subprocess.run([sys.executable, "-c", STEPS, options], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_step_options_on_cpu_only():
    from dit import backend

    assert backend.step_compiler_options("cpu") == backend.CPU_STEP_OPTIONS  # this jax has the option
    assert backend.step_compiler_options("gpu") is None
    assert backend.step_compiler_options("tpu") is None


def test_unknown_step_option_falls_back_to_xla_defaults(monkeypatch):
    from dit import backend

    monkeypatch.setattr(backend, "CPU_STEP_OPTIONS", {"xla_cpu_no_such_option": "1"})
    backend.cpu_step_options.cache_clear()
    try:
        assert backend.step_compiler_options("cpu") is None
    finally:
        backend.cpu_step_options.cache_clear()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc on Linux, and page faults as Linux counts them")
def test_split_temporaries_same_bytes_fewer_fresh_pages():
    none, project, fine = (run_steps(k) for k in ("none", "project", "1MB"))
    # where the temporaries live is not the maths: the same params, EMA and optimizer state, to the bit
    assert none["sha"] == project["sha"] == fine["sha"]
    # XLA's defaults: one mmap'ed block per call, every page of it faulted in anew (~70,000 pages a step
    # here). With the settings most steps fault no page; a step that lands on a thread whose malloc arena is
    # still cold faults its blocks in once, so the median, not the sum, is what they change.
    median = lambda r: float(np.median(r["faults"]))
    assert median(none) > 20_000, none
    assert median(project) < median(none) / 10, (project, none)
