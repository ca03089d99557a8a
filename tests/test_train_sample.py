"""Train and sample stages on tiny data: Orbax checkpoints, logs, and determinism on 1 device or 8."""

import json
import shutil

import numpy as np
import pytest

from conftest import run_stage
from test_encode import tiny_vae

EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
ONE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
TRAIN = ["--set", "train.steps=6", "--set", "train.global_batch_size=16", "--set", "train.log_every=2",
         "--set", "train.ckpt_every=3", "--set", "train.depth=2", "--set", "train.hidden_size=32",
         "--set", "train.num_heads=2"]
SAMPLE = ["--set", "sample.num_samples=12", "--set", "sample.num_sampling_steps=4",
          "--set", "sample.batch_size=8", "--set", "sample.grid_per_class=2"]


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    from conftest import ROOT

    wd = tmp_path_factory.mktemp("ts")
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, wd / name)
    run_stage("data", wd, "--set", "data.limit=40", "--set", "data.image_size=16")
    tiny_vae(wd / "artifacts/vae")
    run_stage("encode", wd, "--set", "data.image_size=16", "--set", "encode.num_workers=1",
              "--set", "encode.batch_size=8", "--set", "encode.shards=2")
    return wd


def train(wd, env, *extra):
    run_stage("train", wd, *TRAIN, *extra, env=env)
    m = json.loads((wd / "artifacts/checkpoints/manifest.json").read_text())
    log = [json.loads(l) for l in (wd / "artifacts/logs/train.jsonl").read_text().splitlines()]
    return m, log


@pytest.fixture(scope="module")
def trained(latents):
    return train(latents, ONE)


def test_train_writes_orbax_checkpoints_and_log(latents, trained):
    m, log = trained
    steps = sorted(int(p.name) for p in (latents / "artifacts/checkpoints/orbax").iterdir()
                   if p.name.isdigit())
    assert steps[-1] == 6 and 3 in steps
    assert [r["step"] for r in log] == [1, 2, 4, 6] and "compile_s" in log[0]
    assert all(r["img_per_s"] > 0 for r in log[1:]) and all(np.isfinite(r["loss"]) for r in log)
    assert m["counts"] == {"steps": 6, "images_seen": 96} and len(m["ema_sha256"]) == 64
    model = json.loads((latents / "artifacts/checkpoints/model.json").read_text())
    assert model["dit"]["input_size"] == 8 and model["dit"]["num_classes"] == 10


def test_bad_mesh_is_one_line(latents):
    proc = run_stage("train", latents, *TRAIN, "--set", "train.mesh={data: 3, fsdp: 1}", env=ONE,
                     check=False)
    assert proc.returncode == 2 and "train.mesh" in proc.stderr


def test_train_same_bytes_twice_and_close_on_eight_devices_with_fsdp(latents, trained):
    first, log1 = trained
    again, log2 = train(latents, ONE)
    assert first["ema_sha256"] == again["ema_sha256"]
    assert [r["loss"] for r in log1] == [r["loss"] for r in log2]
    eight, log8 = train(latents, EIGHT, "--set", "train.mesh={data: 2, fsdp: 4}")
    assert eight["devices"] == 8 and eight["mesh"] == {"data": 2, "fsdp": 4}
    # the same data, keys and math; only the order of floating-point sums across devices differs
    np.testing.assert_allclose([r["loss"] for r in log8], [r["loss"] for r in log1], rtol=1e-4)


def run_two_hosts(stage, wd, *args):
    """`python -m stages.<stage>` as two JAX processes on loopback (gloo), one CPU device each."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for pid in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE, "JAX_PLATFORMS": "cpu",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen([sys.executable, "-m", f"stages.{stage}", *args], cwd=wd,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    except subprocess.TimeoutExpired:  # a process waiting at a barrier the other never reaches
        for p in procs:
            p.kill()
        raise AssertionError(f"stages.{stage} on two hosts did not finish in 300 s:\n"
                             + "\n".join(p.communicate()[0] for p in procs)[-4000:]) from None
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]


def test_train_across_two_hosts_with_parameters_sharded_over_them(latents, tmp_path):
    """Two processes, the parameters FSDP-sharded across them: both write their shards into one Orbax
    folder, process 0 renames it into place, and a one-process sampler restores an EMA with the hash
    the trainer recorded (it refuses any other)."""
    wd = tmp_path / "run"  # a copy, so the module's one-process checkpoint stays as it is
    shutil.copytree(latents, wd, ignore=shutil.ignore_patterns("checkpoints", "samples", "logs"))
    run_two_hosts("train", wd, *TRAIN, "--set", "train.mesh={data: 1, fsdp: 2}")
    ckpt = wd / "artifacts/checkpoints"
    m = json.loads((ckpt / "manifest.json").read_text())
    assert m["processes"] == 2 and m["devices"] == 2 and m["mesh"] == {"data": 1, "fsdp": 2}
    assert m["counts"] == {"steps": 6, "images_seen": 96}
    steps = sorted(int(p.name) for p in (ckpt / "orbax").iterdir() if p.name.isdigit())
    assert steps[-1] == 6 and 3 in steps
    assert not list(ckpt.parent.glob(".checkpoints.*")), "a temp folder was left behind"
    log = [json.loads(l) for l in (wd / "artifacts/logs/train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 4, 6] and all(np.isfinite(r["loss"]) for r in log)
    run_stage("sample", wd, *SAMPLE, env=ONE)
    sm = json.loads((wd / "artifacts/samples/manifest.json").read_text())
    assert sm["ema_sha256"] == m["ema_sha256"] and sm["checkpoint_step"] == 6
