"""The sample stage on a tiny trained model: the same bytes on any device or host count (by construction:
a chunk is one device's call of a fixed shape), resume after SIGKILL, memory that does not grow with
num_samples, labels, and bad input."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, run_stage, without_device_count
from test_encode import tiny_vae_params
from test_train_sample import latents  # noqa: F401  (the module fixture)

pytestmark = pytest.mark.slow  # sample stage runs

ONE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
SAMPLE = ["--set", "sample.num_samples=12", "--set", "sample.num_sampling_steps=4",
          "--set", "sample.batch_size=4", "--set", "sample.grid_per_class=2"]
TINY = ["--set", "train.steps=4", "--set", "train.global_batch_size=8", "--set", "train.log_every=2",
        "--set", "train.ckpt_every=4", "--set", "train.depth=2", "--set", "train.hidden_size=32",
        "--set", "train.num_heads=2"]


def devices(n):
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


@pytest.fixture(scope="module")
def trained(latents):
    """The shared tiny data, VAE and latents (test_train_sample's fixture), trained a few steps."""
    run_stage("train", latents, *TINY, env=ONE)
    return latents


def sample(wd, *extra, env=ONE, check=True):
    return run_stage("sample", wd, *SAMPLE, *extra, env=env, check=check)


def outputs(wd):
    out = wd / "artifacts/samples"
    data = (out / "samples.npz").read_bytes()
    return hashlib.sha256(data).hexdigest(), json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def baseline(trained):
    proc = sample(trained)
    assert "moved aside" not in proc.stdout  # a first run has nothing to move aside
    return outputs(trained)


def test_samples_npz_is_adm_format_with_a_manifest(trained, baseline):
    with np.load(trained / "artifacts/samples/samples.npz", allow_pickle=False) as s:
        images, labels = s["arr_0"], s["arr_1"]
    assert images.shape == (12, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(12) % 10)
    m = baseline[1]
    assert m["counts"] == {"samples": 12, "chunks": 3, "chunks_reused": 0, "chunks_computed": 3}
    assert m["samples_sha256"] == baseline[0] and m["sampler"]["per_device_batch"] == 4
    assert (trained / "artifacts/samples/grid.png").is_file()
    # the paper's compute columns, from dit.flops at the latent size trained
    from dit.flops import count_flops
    from dit.models import DiTConfig

    config = DiTConfig(**json.loads((trained / "artifacts/checkpoints/model.json").read_text())["dit"])
    g = count_flops(config) / 1e9
    assert m["cost"]["gflops"] == pytest.approx(g, rel=1e-5)
    assert m["cost"]["train_gflops"] == pytest.approx(g * 3 * 8 * 4, rel=1e-5)  # batch 8, 4 steps
    assert m["cost"]["sample_gflops_per_image"] == pytest.approx(g * 4 * 2, rel=1e-5)  # 4 steps, CFG


@pytest.mark.parametrize("n_dev", [2, 3, 4, 8])
def test_same_bytes_on_any_device_count(trained, baseline, n_dev):
    """Fresh work folder each time: every chunk is recomputed on n_dev devices (3: a step of 3 chunks
    and none left over; 8: five padding chunks thrown away; 2: a padded last step)."""
    shutil.rmtree(trained / "artifacts/.sample-work")
    sample(trained, env=devices(n_dev))
    digest, m = outputs(trained)
    assert m["devices"] == n_dev and m["counts"]["chunks_computed"] == 3
    assert digest == baseline[0]


def test_cpu_devices_param_spreads_chunks_with_the_same_bytes(trained, baseline):
    """With no device count in XLA_FLAGS, sample.cpu_devices sets the CPU devices: a speed knob only."""
    shutil.rmtree(trained / "artifacts/.sample-work")
    env = without_device_count()
    sample(trained, "--set", "sample.cpu_devices=3", env=env)
    digest, m = outputs(trained)
    assert m["devices"] == 3 and m["counts"]["chunks_computed"] == 3
    assert digest == baseline[0]
    bad = sample(trained, "--set", "sample.cpu_devices=0", env=env, check=False)
    assert bad.returncode == 2 and "sample.cpu_devices" in bad.stderr


def test_rerun_reuses_every_chunk_and_more_samples_extend_them(trained, baseline):
    sample(trained)
    digest, m = outputs(trained)
    assert digest == baseline[0] and m["counts"]["chunks_reused"] == 3
    sample(trained, "--set", "sample.num_samples=14")
    _, m = outputs(trained)
    assert m["counts"] == {"samples": 14, "chunks": 4, "chunks_reused": 3, "chunks_computed": 1}
    with np.load(trained / "artifacts/samples/samples.npz", allow_pickle=False) as s:
        assert s["arr_0"].shape[0] == 14


def test_another_per_device_batch_is_close(trained, baseline):
    """The per-device batch is the compiled shape, so it is part of the result: another batch size
    moves the old chunks aside (one line) and agrees to uint8 rounding, not bit for bit (other kernels)."""
    with np.load(trained / "artifacts/samples/samples.npz", allow_pickle=False) as s:
        ref = s["arr_0"][:12].astype(int)
    proc = sample(trained, "--set", "sample.batch_size=5")
    assert "moved aside" in proc.stdout and "sample.batch_size" in proc.stdout
    with np.load(trained / "artifacts/samples/samples.npz", allow_pickle=False) as s:
        other = s["arr_0"].astype(int)
    diff = np.abs(other - ref)
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01


def test_batch_invariant_runs_in_the_stage(trained):
    """sample.batch_invariant through the stage: batch_size 8 on one device and 5 on two give the same
    samples.npz, and a bad value is one line. (At this tiny width the batched program happens to agree
    too; the next test is the one whose batched counterpart differs.)"""
    on = ["--set", "sample.batch_invariant=true"]
    sample(trained, *on, "--set", "sample.batch_size=8")
    eight, m = outputs(trained)
    assert m["counts"] == {"samples": 12, "chunks": 2, "chunks_reused": 0, "chunks_computed": 2}
    assert m["sampler"]["batch_invariant"] is True
    sample(trained, *on, "--set", "sample.batch_size=5", env=devices(2))
    five, m = outputs(trained)
    assert m["counts"]["chunks"] == 3 and m["devices"] == 2 and five == eight
    bad = sample(trained, "--set", "sample.batch_invariant=maybe", check=False)
    assert bad.returncode == 2 and "sample.batch_invariant" in bad.stderr


def test_batch_invariant_sampler_gives_the_same_bytes_for_batch_8_and_5():
    """chunk_program's one-sample-at-a-time program on a width-128 DiT (the embedded default's width) and
    a tiny VAE: 16 samples made in chunks of 8 and of 5 are the same uint8 bytes. The batched program
    runs other GEMM shapes per batch size, and here (XLA:CPU, AMD EPYC) its bytes differ in a few values."""
    import jax
    import jax.numpy as jnp

    from dit import vae as vae_lib
    from dit.diffusion import create_diffusion
    from dit.models import DiT, DiTConfig
    from dit.sharding import batch_sharding, make_mesh
    from stages.runtime.sampler import build_sampler, chunk_program, run_sampler

    config = DiTConfig(input_size=8, hidden_size=128, depth=2, num_heads=4, num_classes=10)
    model = DiT(config)
    zeros = jnp.zeros((2,), jnp.int32)
    params = model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 4)), zeros, zeros)["params"]
    leaves, tree = jax.tree.flatten(params)  # off the zero init, so every layer matters
    noise = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, noise)])
    vae_config, vae_params = tiny_vae_params()
    vae = vae_lib.AutoencoderKL(vae_config)
    diffusion = create_diffusion(timestep_respacing="4", learn_sigma=True)
    mesh = make_mesh(-1, 1, jax.devices()[:1])
    cfg = {"cfg_scale": 4.0, "guided_channels": 3, "batch_invariant": True, "labels": "balanced", "classes": None}
    sampler = build_sampler(chunk_program(model, vae, diffusion, cfg, 0.5, (8, 8, 4)), mesh)
    root, shard = jax.random.key(3), batch_sharding(mesh)
    made = {}
    for b in (8, 5):
        chunks = [run_sampler(sampler, params, vae_params, root, cfg, np.arange(lo, lo + b), shard, 10)[0]
                  for lo in range(0, 16, b)]
        made[b] = np.concatenate([np.asarray(c) for c in chunks])[:16]
    assert made[8].std() > 0
    np.testing.assert_array_equal(made[8], made[5])


@pytest.mark.parametrize("spacing, kind", [("ddim3", "ddim"), ("dpm++3", "dpm++2m")])
def test_every_sampler_runs_in_the_stage(trained, spacing, kind):
    sample(trained, "--set", f"sample.num_sampling_steps={spacing}")
    _, m = outputs(trained)
    assert m["sampler"]["kind"] == kind and m["sampler"]["respacing"] == spacing
    assert m["cost"]["sample_gflops_per_image"] == pytest.approx(m["cost"]["gflops"] * 3 * 2)
    with np.load(trained / "artifacts/samples/samples.npz", allow_pickle=False) as s:
        assert s["arr_0"].shape == (12, 16, 16, 3) and s["arr_0"].std() > 0


def test_a_corrupt_chunk_is_recomputed_and_listed(trained, baseline):
    sample(trained)  # the module's chunks again (batch_size 4)
    chunk = trained / "artifacts/.sample-work/chunk-000001.npz"
    chunk.write_bytes(chunk.read_bytes()[:-7] + b"garbage")
    sample(trained)
    digest, m = outputs(trained)
    assert digest == baseline[0]
    assert m["counts"]["chunks_computed"] == 1
    assert m["chunks_recomputed"][0]["item"] == "chunk-000001.npz"


def test_sigkill_then_rerun_gives_the_same_bytes(trained, baseline):
    """Killed as soon as its first chunk is on disk, the rerun keeps the finished chunks."""
    shutil.rmtree(trained / "artifacts/.sample-work")
    shutil.rmtree(trained / "artifacts/samples")
    # 120 chunks of 50 steps: time to kill it midway
    many = ["--set", "sample.batch_size=1", "--set", "sample.num_samples=120",
            "--set", "sample.num_sampling_steps=50"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE}
    proc = subprocess.Popen([sys.executable, "-m", "stages.sample", *SAMPLE, *many], cwd=trained, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = trained / "artifacts/.sample-work"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(work.glob("*.sha256"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(work.glob("*.sha256")))
    assert 0 < finished < 120, f"killed with {finished} of 120 chunks done"
    assert not (trained / "artifacts/samples/samples.npz").exists()
    sample(trained, *many)
    digest, m = outputs(trained)
    assert m["counts"]["chunks_reused"] >= finished - 1 and m["counts"]["chunks_computed"] >= 1
    # the uninterrupted run with the same per-device batch
    shutil.rmtree(work)
    sample(trained, *many)
    assert outputs(trained)[0] == digest


def test_peak_memory_does_not_grow_with_num_samples(trained):
    """No array of all samples anywhere: peak RSS for 2,000 and 8,000 samples differs by less than one
    chunk (and far less than the 6,000 extra samples' 4.6 MB)."""
    code = ("import resource, runpy, sys; sys.argv = ['stages.sample'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('stages.sample', run_name='__main__')\n"
            "finally:\n    print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE}
    rss = {}
    chunk = 500
    for n in (2000, 8000):
        proc = subprocess.run([sys.executable, "-c", code, "--set", f"sample.num_samples={n}",
                               "--set", "sample.num_sampling_steps=2", "--set", f"sample.batch_size={chunk}",
                               "--set", "sample.cfg_scale=1.0"],
                              cwd=trained, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rss[n] = int(proc.stdout.split("MAXRSS")[-1].split()[0]) * 1024
    one_chunk = chunk * 16 * 16 * 3
    assert abs(rss[8000] - rss[2000]) < one_chunk, rss


def test_uniform_labels_come_from_the_seed(trained):
    sample(trained, "--set", "sample.labels=uniform", "--set", "sample.classes=[3, 7]")
    with np.load(trained / "artifacts/samples/samples.npz", allow_pickle=False) as s:
        labels = s["arr_1"]
    assert set(labels.tolist()) <= {3, 7} and len(set(labels.tolist())) == 2
    shutil.rmtree(trained / "artifacts/.sample-work")
    sample(trained, "--set", "sample.labels=uniform", "--set", "sample.classes=[3, 7]", env=devices(2))
    with np.load(trained / "artifacts/samples/samples.npz", allow_pickle=False) as s:
        np.testing.assert_array_equal(s["arr_1"], labels)


def test_sample_refuses_an_edited_checkpoint(trained):
    path = trained / "artifacts/checkpoints/manifest.json"
    original = path.read_text()
    m = json.loads(original)
    m["ema_sha256"] = "0" * 64
    path.write_text(json.dumps(m))
    try:
        proc = sample(trained, check=False)
    finally:
        path.write_text(original)
    assert proc.returncode == 2 and "modified" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--set", "sample.num_samples=0"], "sample.num_samples"),
    (["--set", "sample.labels=zipf"], "sample.labels"),
    (["--set", "sample.classes=[3, 10]"], "out of range"),
    (["--set", "sample.num_sampling_steps=ddim7x"], "sample.num_sampling_steps"),
])
def test_bad_params_are_one_line(trained, args, message):
    proc = sample(trained, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_unwritable_work_folder_is_one_line(trained):
    work = trained / "artifacts/.sample-work"
    moved = work.with_name("moved-work")
    work.rename(moved)
    work.write_text("a file where the work folder should be")
    try:
        proc = sample(trained, check=False)
    finally:
        work.unlink()
        moved.rename(work)
    assert proc.returncode == 2 and ".sample-work" in proc.stderr


def test_two_hosts_write_their_own_chunks_and_the_same_bytes(trained, baseline):
    """Two JAX processes on loopback (gloo), one device each: each writes the chunks its device made;
    process 0 merges them into the same samples.npz as one process."""
    from test_train_sample import run_two_hosts

    shutil.rmtree(trained / "artifacts/.sample-work")
    run_two_hosts("sample", trained, *SAMPLE)
    digest, m = outputs(trained)
    assert m["devices"] == 2 and m["processes"] == 2 and m["counts"]["chunks_computed"] == 3
    assert digest == baseline[0]
