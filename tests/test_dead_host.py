"""A process that dies in a multi-host job (SIGKILL, as a preempted or failed VM): every survivor exits non-zero
within the bound, the last complete checkpoint or chunk stays intact, and rerunning every process continues
to the bytes an uninterrupted run with the same process count gives. Processes are JAX processes on loopback
(jax.distributed, gloo), one CPU device each."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from conftest import ROOT, run_stage
from test_train_sample import ONE, SAMPLE, TRAIN, fresh_copy, latents  # noqa: F401  (the module fixture)

pytestmark = pytest.mark.slow
BOUND_S = 120  # docs/multihost.md: a survivor exits within the heartbeat timeout, 60 s by default
STEPS = ["--set", "train.steps=40", "--set", "train.ckpt_every=10", "--set", "train.log_every=1"]


def start(stage, wd, n, args, env=None):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for pid in range(n):
        full = {**os.environ, "PYTHONPATH": str(ROOT), **ONE, "JAX_PLATFORMS": "cpu",
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(n),
                "JAX_PROCESS_ID": str(pid), **(env or {})}
        out = tempfile.TemporaryFile("w+")
        procs.append((subprocess.Popen([sys.executable, "-m", f"stages.{stage}", *args], cwd=wd, env=full,
                                       stdout=out, stderr=subprocess.STDOUT, text=True), out))
    return procs


def finish(procs, timeout=400):
    """(return codes, outputs) once every process has ended."""
    deadline = time.time() + timeout
    for p, _ in procs:
        try:
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    outs = []
    for _, f in procs:
        f.seek(0)
        outs.append(f.read())
        f.close()
    return [p.returncode for p, _ in procs], outs


def run(stage, wd, n, args):
    codes, outs = finish(start(stage, wd, n, args))
    assert codes == [0] * n, "\n".join(o[-2000:] for o in outs)


def kill_when(procs, victim, ready, timeout=300):
    """SIGKILL process `victim` once ready() holds; (seconds each survivor took to exit, codes, outputs)."""
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and all(p.poll() is None for p, _ in procs):
        time.sleep(0.05)
    assert ready() and all(p.poll() is None for p, _ in procs), "the job ended or stalled before the kill"
    procs[victim][0].kill()
    killed, took = time.time(), {}
    while any(p.poll() is None for i, (p, _) in enumerate(procs) if i != victim) and time.time() < killed + BOUND_S + 60:
        for i, (p, _) in enumerate(procs):
            if i != victim and i not in took and p.poll() is not None:
                took[i] = time.time() - killed
        time.sleep(0.05)
    for i, (p, _) in enumerate(procs):
        if i != victim and i not in took and p.poll() is not None:
            took[i] = time.time() - killed
    codes, outs = finish(procs, timeout=30)
    return took, codes, outs


def ema_sha(wd):
    return json.loads((wd / "artifacts/checkpoints/manifest.json").read_text())["ema_sha256"]


def orbax_steps(wd):
    d = wd / "artifacts/checkpoints/orbax"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.mark.parametrize("n, victim", [(2, 1), (3, 0)])  # a non-zero process; the coordinator
def test_a_dead_process_stops_the_others_and_the_rerun_ends_with_the_same_bytes(latents, tmp_path, n, victim):
    args = [*TRAIN, *STEPS, "--set", f"train.global_batch_size={8 * n}"]
    ref = fresh_copy(latents, tmp_path / "ref")
    run("train", ref, n, args)
    wd = fresh_copy(latents, tmp_path / "wd")
    took, codes, outs = kill_when(start("train", wd, n, args), victim, lambda: len(orbax_steps(wd)) >= 1)
    survivors = [i for i in range(n) if i != victim]
    assert sorted(took) == survivors and all(t < BOUND_S for t in took.values()), took
    assert all(codes[i] != 0 for i in survivors), codes
    said = [line.split("error: ", 1)[1] for i in survivors for line in outs[i].splitlines()  # after a progress bar
            if "error: train:" in line]
    assert said and all("rerun every process" in line for line in said), "\n".join(outs)[-3000:]
    kept = orbax_steps(wd)
    assert kept and kept[-1] >= 10
    run("train", wd, n, args)  # every process again: resumes from the last complete checkpoint
    m = json.loads((wd / "artifacts/checkpoints/manifest.json").read_text())
    assert m["resumed_from_step"] == kept[-1] and not m["damaged_steps"]
    assert ema_sha(wd) == ema_sha(ref)
    print(f"{n} processes, process {victim} killed: survivors exited in "
          f"{', '.join(f'{t:.1f} s' for t in took.values())}; resumed from step {kept[-1]}")


def test_a_dead_sampler_keeps_its_finished_chunks_and_the_rerun_gives_the_same_samples(latents, tmp_path):
    wd = fresh_copy(latents, tmp_path / "wd")
    run_stage("train", wd, *TRAIN, env=ONE)
    many = [*SAMPLE, "--set", "sample.num_samples=96", "--set", "sample.batch_size=4",
            "--set", "sample.num_sampling_steps=50"]
    one = tmp_path / "one"
    shutil.copytree(wd, one)
    run_stage("sample", one, *many, env=ONE)  # the bytes: the same on one process or two (chunks are per device)
    work = wd / "artifacts/.sample-work"
    took, codes, outs = kill_when(start("sample", wd, 2, many), 1, lambda: len(list(work.glob("*.sha256"))) >= 4)
    assert list(took) == [0] and took[0] < BOUND_S and codes[0] != 0, (took, codes, outs[0][-2000:])
    finished = sorted(p.name for p in work.glob("*.sha256"))
    assert finished and not (wd / "artifacts/samples/samples.npz").exists()
    run("sample", wd, 2, many)
    m = json.loads((wd / "artifacts/samples/manifest.json").read_text())
    assert m["counts"]["chunks_reused"] >= len(finished) and m["chunks_recomputed"] == []
    with np.load(wd / "artifacts/samples/samples.npz") as a, np.load(one / "artifacts/samples/samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
