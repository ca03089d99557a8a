"""The TPU plan (python -m stages.plan) on this CPU with libtpu: the embedded default's model compiled for two
Cloud TPU topologies, one where it fits and one where it cannot, bad input, and what each of v5e:16x16's 64
hosts reads and writes. Compiles for TPU need libtpu, which make installs into .venv/libtpu."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT

LIBTPU = Path(sys.prefix) / "libtpu"
pytestmark = pytest.mark.skipif(not LIBTPU.is_dir() and not os.environ.get("CI"),
                                reason=f"libtpu is not installed in {LIBTPU} (make installs it)")


def plan(wd, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "stages.plan", *args], cwd=wd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def report(path):
    return {s["stage"]: s for s in json.loads(Path(path).read_text())["stages"]}


def test_the_default_model_fits_a_v5e_slice_with_the_sharding_and_flops_it_should(workdir):
    """Global batch 64 on v5e:2x2 (16 images a chip): the train step and the sample chunk fit; each chip's
    arguments are its shards of the train state (about the state / fsdp) plus its batch rows (so the
    sharding was applied); the compiled flops are the model's plus what the model count leaves out: AdamW
    and the EMA (~20 flops a parameter), softmax, layer norms, GELU and the loss. For this small model (0.6M parameters, 16 tokens
    an image) that was 1.047x on fsdp 1 (DiT-XL/2 on v5e:16x16: 1.028x). The sampler's loop, counted once
    by XLA, is scaled by its steps: 1.03x the model's flops (the slow test below)."""
    args = {}
    for fsdp in (1, 4):
        out = workdir / f"plan{fsdp}.json"
        proc = plan(workdir, "--topology", "v5e:2x2", "--stages", "train", "--set", f"train.mesh.fsdp={fsdp}",
                    "--set", "train.mesh.data=-1", "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        r = report(out)
        train = r["train"]
        assert train["fits"] and train["mesh"] == {"data": 4 // fsdp, "fsdp": fsdp} and train["per_chip_batch"] == 16
        batch_rows = 16 * (2 * 8 * 8 * 4 * 4 + 4) / 2 ** 30  # mean, logvar (8x8x4 float32) and a label each
        # TPU stores arrays in (8, 128) tiles, so this model's small tensors (biases of 32 to 128) take more
        # room than their elements: 6 % more of its 5 MB on fsdp 1 (libtpu 0.0.42.1)
        need = train["state_gib_per_chip"] + batch_rows
        assert need <= train["argument_gib"] < 1.15 * need, (train["argument_gib"], need)
        assert train["state_gib_per_chip"] < 1.1 * train["state_gib"] / fsdp  # nearly every tensor divided
        args[fsdp] = train["argument_gib"]
        assert 1.0 < train["flops_ratio"] < 1.1, train["flops_ratio"]
        assert train["hosts_rows_contiguous"] and 0 < train["mfu_bound"] <= 1
    assert args[4] < 0.35 * args[1]  # fsdp 4: each chip holds about a quarter of the state
    assert "train" in proc.stdout and "MFU <=" in proc.stdout


def test_a_batch_that_cannot_fit_is_refused_with_exit_3_and_what_would_help(workdir):
    """65,536 images on one v5e chip: XLA refuses the step (RESOURCE_EXHAUSTED); the plan names the stage,
    the shortfall and what would make it fit."""
    proc = plan(workdir, "--topology", "v5e:1x1", "--stages", "train", "--set", "train.global_batch_size=65536")
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train does not fit: ") and "GiB of temporaries over the chip's HBM" in last
    assert "train.mesh.fsdp" in last and "train.remat" in last


@pytest.mark.parametrize("args, needle", [
    (["--topology", "v5e-17"], "--topology: 'v5e-17' is not a v5e slice size"),
    (["--topology", "tpu-pod"], "--topology: 'tpu-pod' is not a Cloud TPU topology; use GEN:AxB"),
    (["--topology", "v5e:2x2", "--set", "train.mesh.fsdp=3"], "train.mesh.fsdp: 3 does not divide the 4 devices"),
    (["--topology", "v5e:2x2", "--set", "train.no_such=1"], "train.no_such"),
    (["--topology", "v5e:2x2", "--params", "nope.yaml"], "--params nope.yaml: no such file"),
])
def test_bad_input_is_one_line_exit_2(workdir, args, needle):
    proc = plan(workdir, "--stages", "train", *args, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]


HOSTS = textwrap.dedent("""
    import json, sys
    import numpy as np
    from stages.tools.plan import use_libtpu
    from stages.tools.topology import parse
    topo = parse("v5e:16x16")
    use_libtpu(topo)
    from jax.sharding import Mesh
    from dit.sharding import BATCH_AXES, batch_sharding, make_mesh
    from stages.runtime.train_step import host_rows
    from stages.tools.plan import hosts_chunks_once

    devices = sorted(topo.devices(), key=lambda d: d.id)  # by id, as a pod may list them: hosts interleave
    out = {"hosts": len({d.process_index for d in devices}), "first_host_ids": [d.id for d in devices
                                                                                 if d.process_index == 0]}
    try:  # the same devices reshaped in id order, without make_mesh's ordering
        host_rows(batch_sharding(Mesh(np.asarray(devices).reshape(256, 1), BATCH_AXES)), 256, 0)
        out["naive"] = "contiguous"
    except ValueError as e:
        out["naive"] = str(e)
    for fsdp in (1, 16, 256):
        shard = batch_sharding(make_mesh(-1, fsdp, devices))
        rows = sorted(host_rows(shard, 256, p) for p in range(out["hosts"]))
        out[fsdp] = {"rows": rows, "chunks_once": hosts_chunks_once(shard, 256, 250)}
    print(json.dumps(out))
""")


def test_every_host_of_a_v5e_256_reads_one_range_and_the_chunks_are_written_once():
    """v5e:16x16 is 64 hosts of 4 chips, and its chip ids interleave the hosts (host 0 holds 0, 1, 16, 17). A
    mesh of the devices in id order would give host 0 rows 0, 1, 16 and 17 of the batch, which the loader
    (one range [lo, hi) a host) cannot read: make_mesh orders them by host first. For fsdp 1, 16 and 256
    each host's rows of a 256-image global batch are then one range, the 64 ranges tile [0, 256) in order,
    and the sample stage's chunks of a call are each written by exactly one host."""
    proc = subprocess.run([sys.executable, "-c", HOSTS], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["hosts"] == 64 and out["first_host_ids"] == [0, 1, 16, 17]
    assert "not one range" in out["naive"]
    for fsdp in ("1", "16", "256"):
        rows = out[fsdp]["rows"]
        assert rows == [[4 * h, 4 * h + 4] for h in range(64)], (fsdp, rows[:4])
        assert out[fsdp]["chunks_once"]


@pytest.mark.slow
def test_the_default_sample_chunk_fits_and_its_loop_is_counted_by_its_steps(workdir):
    """The sample stage's chunk (the guided loop and the VAE decode) for v5e:2x2: it fits, every chunk is
    written by one host, and XLA's flops, which count the denoising loop's body once, scaled by the steps,
    are the model's (1.03x: the guidance mix and the sampler's arithmetic)."""
    out = workdir / "sample.json"
    proc = plan(workdir, "--topology", "v5e:2x2", "--stages", "sample", "--set", "sample.batch_size=8",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sample = report(out)["sample"]
    assert sample["fits"] and sample["hosts_chunks_once"]
    assert sample["flops_ratio"] == pytest.approx(1.0, abs=0.1)


@pytest.mark.slow
def test_the_paper_config_fits_the_slice_its_params_file_names():
    """params-imagenet.yaml names the slice and mesh it is planned for, as the command beside train.mesh: that
    command, run as written, compiles DiT-XL/2's train step there; it fits, with an MFU bound of at least
    40% (docs/tpu.md: 83% on a v5p-8)."""
    import re
    import shlex
    import tempfile

    line = next(line for line in (ROOT / "params-imagenet.yaml").read_text().splitlines() if "stages.plan" in line)
    args = shlex.split(re.search(r"python -m stages\.plan (.*)$", line).group(1))
    with tempfile.TemporaryDirectory() as tmp:
        proc = plan(ROOT, *args, "--stages", "train", "--out", f"{tmp}/plan.json", timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        train = report(f"{tmp}/plan.json")["train"]
    assert train["fits"] and train["mfu_bound"] >= 0.4 and train["per_chip_batch"] == 64
    assert 1.0 < train["flops_ratio"] < 1.05
