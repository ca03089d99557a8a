"""Resume: SIGKILL, SIGTERM and a raised train.steps end with the EMA bytes of an uninterrupted run;
a changed fingerprint moves the old run aside; a non-finite loss stops and keeps the last good checkpoint.

All runs are tiny, on one CPU device, so bytes are compared between runs of the same program.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_stage
from test_train_sample import ONE, TRAIN, fresh_copy, latents  # noqa: F401  (the module fixture)

pytestmark = pytest.mark.slow  # training runs killed and resumed

STEPS = 120
RUN = [*TRAIN, "--set", f"train.steps={STEPS}", "--set", "train.ckpt_every=20", "--set", "train.log_every=1"]


def manifest(wd):
    return json.loads((wd / "artifacts/checkpoints/manifest.json").read_text())


def log(wd):
    return [json.loads(l) for l in (wd / "artifacts/logs/train.jsonl").read_text().splitlines()]


def values(row):
    """A log line without its timings (which differ from run to run)."""
    return {k: v for k, v in row.items() if k not in ("steps_per_s", "img_per_s", "mfu")}


def saved_steps(wd):
    d = wd / "artifacts/checkpoints/orbax"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.fixture(scope="module")
def straight(latents, tmp_path_factory):
    """The uninterrupted reference run."""
    wd = fresh_copy(latents, tmp_path_factory.mktemp("straight") / "wd")
    run_stage("train", wd, *RUN, env=ONE)
    return wd


def interrupt(wd, sig):
    """Start a run, wait until it has logged a random step past its first checkpoint, send `sig`.
    Returns (the process, the step it had logged when signalled)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE}
    proc = subprocess.Popen([sys.executable, "-m", "stages.train", *RUN], cwd=wd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = random.Random().randint(21, STEPS - 30)
    path, logged, deadline = wd / "artifacts/logs/train.jsonl", 0, time.time() + 300
    # past a random step and after the first checkpoint is complete (Orbax saves asynchronously)
    while (logged < target or not saved_steps(wd)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
        if path.is_file():
            lines = [l for l in path.read_text().splitlines() if l.endswith("}")]
            logged = json.loads(lines[-1])["step"] if lines else 0
    assert proc.poll() is None, f"the run ended before step {target}:\n{proc.communicate()[1][-2000:]}"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    print(f"{signal.Signals(sig).name} at logged step {logged} (target {target}, saved {saved_steps(wd)})")
    return proc, logged, err


def assert_unfinished(wd):
    """No manifest: sample refuses the folder (nothing half-written looks whole)."""
    assert not (wd / "artifacts/checkpoints/manifest.json").exists()
    proc = run_stage("sample", wd, env=ONE, check=False)
    assert proc.returncode == 2 and "checkpoints/manifest.json: missing" in proc.stderr


def test_sigkill_then_rerun_gives_the_uninterrupted_bytes(latents, straight, tmp_path):
    wd = fresh_copy(latents, tmp_path / "wd")
    proc, logged, _ = interrupt(wd, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert_unfinished(wd)
    assert 20 <= saved_steps(wd)[-1] <= logged + 1
    run_stage("train", wd, *RUN, env=ONE)
    m = manifest(wd)
    assert 20 <= m["resumed_from_step"] <= logged + 1
    assert m["ema_sha256"] == manifest(straight)["ema_sha256"]
    # the log continues: every step once, with the values of the uninterrupted run
    assert [values(r) for r in log(wd)] == [values(r) for r in log(straight)]
    orbax = wd / "artifacts/checkpoints/orbax"
    assert not [p for p in orbax.iterdir() if "tmp" in p.name], "a dead save's tmp folder was left"
    assert not list((wd / "artifacts").glob(".checkpoints*"))


def test_sigterm_saves_the_current_step_exits_nonzero_and_resumes(latents, straight, tmp_path):
    wd = fresh_copy(latents, tmp_path / "wd")
    proc, logged, err = interrupt(wd, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    stopped = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert stopped >= logged and saved_steps(wd)[-1] == stopped
    assert_unfinished(wd)
    run_stage("train", wd, *RUN, env=ONE)
    m = manifest(wd)
    assert m["resumed_from_step"] == stopped
    assert m["ema_sha256"] == manifest(straight)["ema_sha256"]
    assert [r["step"] for r in log(wd)] == list(range(1, STEPS + 1))


def test_raising_steps_continues_a_finished_run(latents, straight, tmp_path):
    wd = fresh_copy(latents, tmp_path / "wd")
    run_stage("train", wd, *RUN, "--set", f"train.steps={STEPS // 2}", env=ONE)
    assert manifest(wd)["final_step"] == STEPS // 2
    again = run_stage("train", wd, *RUN, "--set", f"train.steps={STEPS // 2}", env=ONE)
    assert "nothing to do" in again.stdout
    run_stage("train", wd, *RUN, env=ONE)
    m = manifest(wd)
    assert m["resumed_from_step"] == STEPS // 2 and m["final_step"] == STEPS
    assert m["ema_sha256"] == manifest(straight)["ema_sha256"]


def test_a_changed_fingerprint_moves_the_run_aside_and_starts_fresh(straight, tmp_path):
    """Another lr, and (as after a `git pull` that changed the model) a run.json naming another step program
    and other bytes of dit/models.py: the finished run is moved aside, both named with the file that changed
    since, never resumed or kept."""
    from stages.runtime.checkpoint import fingerprint

    wd = tmp_path / "wd"
    shutil.copytree(straight, wd)
    old = manifest(wd)
    run = json.loads((wd / "artifacts/checkpoints/run.json").read_text())
    assert set(run["identity"]["program_sha256"]) == {"init", "step"} and len(run["identity"]["data_sha256"]) == 64
    assert {"dit/models.py", "stages/train.py", "stages/runtime/loader.py"} <= set(run["sources"])
    run["identity"]["program_sha256"]["step"] = "0" * 64  # what older code's run.json would hold
    run["sources"]["dit/models.py"] = "0" * 64
    run["fingerprint"] = fingerprint(run["identity"])
    (wd / "artifacts/checkpoints/run.json").write_text(json.dumps(run))
    proc = run_stage("train", wd, *RUN, "--set", "train.steps=3", "--set", "train.lr=0.002", env=ONE)
    said = [l for l in proc.stdout.splitlines() if "moved to" in l]
    assert len(said) == 1 and "train.lr 0.001 -> 0.002" in said[0], proc.stdout
    assert "program_sha256.step '000000000000' -> " in said[0] and "changed since: dit/models.py" in said[0]
    assert "nothing to do" not in proc.stdout
    aside = list((wd / "artifacts/checkpoints.aside").iterdir())
    assert len(aside) == 1 and json.loads((aside[0] / "manifest.json").read_text()) == old
    assert (aside[0] / "train.jsonl").is_file()
    m = manifest(wd)
    assert m["resumed_from_step"] == 0 and m["final_step"] == 3 and m["fingerprint"] != old["fingerprint"]
    assert saved_steps(wd) == [3] and [r["step"] for r in log(wd)] == [1, 2, 3]


def test_a_checkpoint_of_another_model_config_is_refused_untouched(straight, tmp_path):
    """A folder whose run.json claims this run (the run.json a real hidden_size=48 run wrote) but whose
    weights are another model's: exit 2, nothing touched."""
    from stages.runtime.common import sha256_tree

    other = tmp_path / "other"
    shutil.copytree(straight, other)
    shutil.rmtree(other / "artifacts/checkpoints")
    run_stage("train", other, *RUN, "--set", "train.hidden_size=48", "--set", "train.steps=1", env=ONE)
    wd = tmp_path / "wd"
    shutil.copytree(straight, wd)
    ckpt = wd / "artifacts/checkpoints"
    shutil.copy(other / "artifacts/checkpoints/run.json", ckpt / "run.json")
    before = sha256_tree(ckpt)
    proc = run_stage("train", wd, *RUN, "--set", "train.hidden_size=48", env=ONE, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()[-1]) < 400, proc.stderr[-2000:]
    assert "orbax/120" in proc.stderr and "another model config" in proc.stderr
    assert "checkpoint has (192,)" in proc.stderr and "needs (288,)" in proc.stderr, proc.stderr
    assert sha256_tree(ckpt) == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(latents, tmp_path):
    wd = fresh_copy(latents, tmp_path / "wd")
    proc = run_stage("train", wd, *TRAIN, "--set", "train.lr=1e30", "--set", "train.ckpt_every=1",
                     "--set", "train.steps=8", env=ONE, check=False)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "non-finite loss at step" in line and "train.lr" in line and "train.grad_clip" in line
    bad = int(line.split("non-finite loss at step ")[1].split()[0])
    assert saved_steps(wd) == list(range(max(1, bad - 3), bad))  # the last 3 before it, none after
    assert not (wd / "artifacts/checkpoints/manifest.json").exists()
