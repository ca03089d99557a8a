"""A full disk, for real: a small tmpfs the test mounts under a run's artifacts/ (root can on these machines and
in CI; elsewhere the tests skip, and under CI they fail instead). ENOSPC while writing a checkpoint, a sample
chunk, the encode shards or a `dvc repro` stage's output is one line naming the disk and a non-zero exit;
what was complete before stays intact; after the space is freed the next run continues as after a kill and
gives the uninterrupted bytes. The trainer also refuses a run whose checkpoints cannot fit, and stops, with
every process, before a save the disk has no room for."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_stage
from test_train_resume import RUN, STEPS, manifest, saved_steps, straight  # noqa: F401  (module fixtures)
from test_train_sample import ONE, SAMPLE, TRAIN, fresh_copy, latents  # noqa: F401

pytestmark = pytest.mark.slow
MIB = 1 << 20


@pytest.fixture
def small_disk(tmp_path):
    """mount(path, mib): a tmpfs of `mib` MiB at `path` (made empty), unmounted at the end."""
    mounted = []

    def mount(path: Path, mib: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode:
            if os.environ.get("CI"):
                pytest.fail(f"cannot mount a tmpfs in CI: {proc.stderr.strip()}")
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def on_small_disk(src: Path, dest: Path, mount, mib: int) -> Path:
    """A copy of the run folder `src` whose artifacts/ is a tmpfs of `mib` MiB."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("artifacts"))
    mount(dest / "artifacts", mib)
    shutil.copytree(src / "artifacts", dest / "artifacts", dirs_exist_ok=True)
    return dest


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves `leave` bytes free on `disk`."""
    ballast = disk / "ballast"
    free = shutil.disk_usage(disk).free
    with open(ballast, "ab") as f:
        f.write(b"\0" * max(0, free - leave))
    return ballast


def one_error_line(proc) -> str:
    lines = [line[line.index("error: "):] for line in proc.stderr.splitlines() if "error: " in line]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def start(stage, wd, *args, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", f"stages.{stage}", *args], cwd=wd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pause_when(proc, ready, timeout=300):
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None and ready(), "the run ended before the disk could be filled"
    proc.send_signal(signal.SIGSTOP)


def test_a_run_whose_checkpoints_cannot_fit_is_refused_before_it_starts(latents, tmp_path, small_disk):
    wd = on_small_disk(fresh_copy(latents, tmp_path / "src"), tmp_path / "wd", small_disk, 16)
    fill(wd / "artifacts", 256 * 1024)  # room for the latents, not for four full states
    proc = run_stage("train", wd, *RUN, env=ONE, check=False)
    line = one_error_line(proc)
    assert "artifacts/checkpoints: the run's checkpoints need" in line and "full states of" in line
    assert not (wd / "artifacts/checkpoints/orbax").exists()


@pytest.mark.parametrize("check", ["1", "0"])
def test_a_disk_that_fills_during_training_loses_at_most_one_interval(latents, straight, tmp_path, small_disk,
                                                                       check):
    """Saves at 40, 80 and 120; once step 40 is on disk the run is paused and the disk filled. check 1: 1.5
    steps' room is left, so step 80 fits (whether its asynchronous save had begun or not) and the trainer
    sees before step 120's save that another step does not, and stops. check 0 (DIT_SPACE_CHECK=0): half a
    step's room, so Orbax's write of step 80 meets ENOSPC itself, and the error is found before the next
    save (or at the end). Both: one line, the complete checkpoints intact, and after the ballast is gone the
    rerun ends with the uninterrupted run's EMA bytes."""
    wd = on_small_disk(fresh_copy(latents, tmp_path / "src"), tmp_path / "wd", small_disk, 64)
    env = {**ONE, "DIT_SPACE_CHECK": check}
    args = [*RUN, "--set", "train.ckpt_every=40"]
    proc = start("train", wd, *args, env=env)
    pause_when(proc, lambda: len(saved_steps(wd)) >= 1)
    size = sum(p.stat().st_size for p in (wd / "artifacts/checkpoints/orbax/40").rglob("*") if p.is_file())
    ballast = fill(wd / "artifacts", size * 3 // 2 if check == "1" else size // 2)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    line = one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    kept = saved_steps(wd)
    if check == "1":
        assert "no room for the checkpoint of step 120" in line and "the last complete one intact (step 80)" in line
        assert kept == [40, 80]
    else:
        assert "train: no space left on device" in line
        assert kept == [40]  # the complete checkpoint before the disk filled, intact
    ballast.unlink()
    run_stage("train", wd, *args, env=env)
    m = manifest(wd)
    assert m["resumed_from_step"] == kept[-1] and not m["damaged_steps"]
    assert m["ema_sha256"] == manifest(straight)["ema_sha256"]


def test_sample_chunks_done_before_the_disk_filled_are_kept(latents, tmp_path, small_disk):
    src = fresh_copy(latents, tmp_path / "src")
    run_stage("train", src, *TRAIN, env=ONE)
    many = [*SAMPLE, "--set", "sample.num_samples=64", "--set", "sample.batch_size=2",
            "--set", "sample.num_sampling_steps=20"]
    ref = tmp_path / "ref"
    shutil.copytree(src, ref)
    run_stage("sample", ref, *many, env=ONE)
    wd = on_small_disk(src, tmp_path / "wd", small_disk, 32)
    work = wd / "artifacts/.sample-work"
    proc = start("sample", wd, *many)
    pause_when(proc, lambda: len(list(work.glob("*.sha256"))) >= 3)
    ballast = fill(wd / "artifacts", 0)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    line = one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert "no space left on device" in line
    done = len(list(work.glob("*.sha256")))
    assert done >= 3 and not (wd / "artifacts/samples").exists()
    ballast.unlink()
    run_stage("sample", wd, *many, env=ONE)
    assert json.loads((wd / "artifacts/samples/manifest.json").read_text())["counts"]["chunks_reused"] >= done
    with np.load(wd / "artifacts/samples/samples.npz") as a, np.load(ref / "artifacts/samples/samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_encode_on_a_full_disk_and_dvc_repro_say_so_in_one_line(latents, tmp_path, small_disk):
    """The encode job's shards do not fit: one line, the old latents kept; freed, the same shard bytes. Then
    the same through `dvc repro`: the stage's line, DVC's non-zero exit, and a clean rerun."""
    src = tmp_path / "src"
    shutil.copytree(latents, src, ignore=shutil.ignore_patterns("checkpoints*", "samples", "logs"))
    args = ["--set", "data.image_size=16", "--set", "encode.num_workers=1", "--set", "encode.batch_size=8",
            "--set", "encode.shards=2"]
    want = {p.name: p.read_bytes() for p in (src / "artifacts/latents").glob("*.array_record")}
    wd = on_small_disk(src, tmp_path / "wd", small_disk, 64)
    shutil.rmtree(wd / "artifacts/latents")
    ballast = fill(wd / "artifacts", 4 * 1024)
    line = one_error_line(run_stage("encode", wd, *args, check=False))
    assert "no space left on device" in line and not (wd / "artifacts/latents").exists()
    ballast.unlink()
    run_stage("encode", wd, *args)
    assert {p.name: p.read_bytes() for p in (wd / "artifacts/latents").glob("*.array_record")} == want

    import yaml

    params = yaml.safe_load((wd / "params.yaml").read_text())  # what the --set flags said, for dvc repro
    params["data"]["image_size"] = 16
    params["encode"].update(num_workers=1, batch_size=8, shards=2)
    (wd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for code in ("stages", "pipelines", "dit", "metrics"):  # the stage's deps, as in a checkout
        shutil.copytree(ROOT / code, wd / code, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=wd, env=env, check=True)
    shutil.rmtree(wd / "artifacts/latents")
    ballast = fill(wd / "artifacts", 4 * 1024)
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "-s", "encode"], cwd=wd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "no space left on device" in proc.stderr + proc.stdout, proc.stderr[-2000:]
    ballast.unlink()
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "-s", "encode"], cwd=wd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in (wd / "artifacts/latents").glob("*.array_record")} == want
