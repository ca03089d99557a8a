"""`dvc repro` of the whole DAG on tiny params in a temporary copy of the repo."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.slow

TINY = {
    "data": {"limit": 60},
    "vae": {"steps": 30, "batch_size": 16},
    "encode": {"shards": 2, "batch_size": 16, "num_workers": 2},
    "train": {"steps": 12, "global_batch_size": 16, "log_every": 5, "ckpt_every": 10,
              "depth": 2, "hidden_size": 64, "num_heads": 2, "keep_every": 6},
    "sample": {"num_samples": 20, "num_sampling_steps": "5", "batch_size": 10, "grid_per_class": 2},
    "curves": {"enabled": True, "num_samples": 20, "train_sampler": "5", "samplers": ["ddim3", "5"]},
    "reference": {"max_images": 25},
    "evaluate": {"batch_size": 20, "fid_method": "sqrtm"},  # ADM's, as params-imagenet.yaml (the default: eigh)
}
STAGES = ["data", "vae", "encode", "train", "sample", "reference", "yardsticks", "evaluate", "curves"]


def merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = merge(base[k], v) if isinstance(v, dict) else v
    return base


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    return out


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def copy_project(dst: Path) -> None:
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
        ".venv", ".git", "artifacts", "__pycache__", ".pytest_cache", "cache", "tmp", "*.egg-info", "dvc.lock"))


def git_commit_all(dst: Path, message: str) -> dict:
    """git init + commit of the copy; returns the env every command in it runs with."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(dst), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    sh(["git", "init", "-q"], dst, env)
    sh(["git", "add", "-A"], dst, env)
    sh(["git", "commit", "-qm", message], dst, env)
    return env


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC repo holding a copy of the project with tiny params, after one `dvc repro`."""
    dst = tmp_path_factory.mktemp("e2e") / "repo"
    copy_project(dst)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    (dst / "params.yaml").write_text(yaml.safe_dump(merge(params, TINY), sort_keys=False))
    env = git_commit_all(dst, "tiny")
    out = sh([sys.executable, "-m", "dvc", "repro"], dst, env)
    return dst, env, out


def test_first_repro_runs_every_stage_and_writes_every_artifact(repo):
    dst, _, out = repo
    assert sorted(ran(out)) == sorted(STAGES), out[-3000:]
    a = dst / "artifacts"
    for stage, folder in [("data", "data"), ("vae", "vae"), ("encode", "latents"),
                          ("train", "checkpoints"), ("sample", "samples"), ("reference", "reference"),
                          ("yardsticks", "yardsticks"), ("evaluate", "eval")]:
        m = json.loads((a / folder / "manifest.json").read_text())
        assert m["stage"] == stage and m["code"]["git_commit"], stage
        c = m["counts"]
        if "total" in c:
            assert c["processed"] + c["skipped"] == c["total"], (stage, c)
    assert len(json.loads((a / "data/index.json").read_text())["items"]) == 60
    assert json.loads((a / "vae/config.json").read_text())["scaling_factor"] > 0
    assert len(list((a / "latents").glob("*.array_record"))) == 2
    assert json.loads((a / "latents/manifest.json").read_text())["counts"]["records"] == 120
    log = [json.loads(l) for l in (a / "logs/train.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 12 and all(np.isfinite(r["loss"]) for r in log)
    with np.load(a / "samples/samples.npz", allow_pickle=False) as s:
        assert s["arr_0"].shape == (20, 32, 32, 3) and s["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(s["arr_1"], np.arange(20) % 10)
    assert (a / "samples/grid.png").stat().st_size > 0
    with np.load(a / "reference/reference.npz", allow_pickle=False) as r:
        assert r["arr_0"].shape == (25, 32, 32, 3) and r["mu"].shape == (2048,)
    metrics = json.loads((a / "eval/metrics.json").read_text())
    assert np.isfinite(metrics["metrics"]["fid"]) and metrics["metrics"]["fid"] > 0
    # the yardsticks beside it, on as many real images as samples: the floor is below the VAE's rFID
    m, yard = metrics["metrics"], metrics["yardsticks"]
    assert yard["num_images"] == 20 and yard["held_out"] is False
    assert 0 < m["fid_floor"] == yard["floor"]["fid"] and m["rfid"] == yard["rfid"]["fid"] > 0
    prov = metrics["provenance"]
    assert prov["checkpoint_step"] == 12 and len(prov["ema_sha256"]) == 64
    assert prov["fid_method"] == "sqrtm"  # ADM's; the reruns below take eigh (5-8x faster)
    assert set(prov["dvc_lock"]) >= {"data", "vae", "encode", "train", "sample", "reference"}


def read_tsv(path: Path) -> list[dict]:
    head, *rows = [line.split("\t") for line in path.read_text().splitlines()]
    return [dict(zip(head, r)) for r in rows]


def test_curves_score_every_kept_ema_and_every_sampler(repo):
    """FID over training from the EMAs kept every 6 steps (6, 12), FID over sampling compute from the
    final EMA; the point shared by both curves (step 12, the training curve's sampler) is one point."""
    dst, _, _ = repo
    a = dst / "artifacts/curves"
    by_step = read_tsv(a / "fid_vs_step.tsv")
    assert [int(r["step"]) for r in by_step] == [6, 12]
    by_sampler = read_tsv(a / "fid_vs_sampling.tsv")
    assert [r["sampler"] for r in by_sampler] == ["ddim3", "5"]  # by sampling compute
    gflops = [float(r["sample_gflops_per_image"]) for r in by_sampler]
    assert gflops[1] / gflops[0] == pytest.approx(5 / 3)
    assert all(np.isfinite(float(r["fid"])) and float(r["fid"]) > 0 for r in by_step + by_sampler)
    assert by_step[1]["fid"] == by_sampler[1]["fid"]
    doc = json.loads((a / "curves.json").read_text())
    assert len(doc["points"]) == 3 and len({p["ema_sha256"] for p in doc["points"]}) == 2
    # the same reference batch as the evaluate stage's FID
    assert doc["reference_sha256"] == json.loads((dst / "artifacts/eval/metrics.json").read_text())[
        "provenance"]["reference_sha256"]


def test_second_repro_runs_nothing(repo):
    dst, env, _ = repo
    out = sh([sys.executable, "-m", "dvc", "repro"], dst, env)
    assert ran(out) == [], out


def audit(dst, env):
    return subprocess.run([sys.executable, "-m", "stages.audit"], cwd=dst, env=env, capture_output=True,
                          text=True, timeout=600)


def while_edited(path, data: bytes, fn):
    """fn() while `path` holds `data` (a file edited after the run), then the original bytes back."""
    original = path.read_bytes()
    path.write_bytes(data)
    try:
        return fn()
    finally:
        path.write_bytes(original)


def test_audit_holds_then_names_the_first_broken_link(repo):
    dst, env, _ = repo
    ok = audit(dst, env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "orbax step 12 EMA weights" in ok.stdout and "dvc status train" in ok.stdout

    samples = dst / "artifacts/samples/samples.npz"
    bad = while_edited(samples, samples.read_bytes() + b"\0", lambda: audit(dst, env))
    assert bad.returncode == 1 and "FAILED at 'metrics <- samples.npz'" in bad.stderr, bad.stderr

    params = (dst / "params.yaml").read_text()
    (dst / "params.yaml").write_text(params.replace("grid_per_class: 2", "grid_per_class: 3"))
    try:
        stale = audit(dst, env)
    finally:
        (dst / "params.yaml").write_text(params)
    assert stale.returncode == 1 and "dvc status sample" in stale.stderr, stale.stdout + stale.stderr


def test_sample_param_reruns_only_sample_and_evaluate(repo):
    dst, env, _ = repo
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["sample"]["cfg_scale"] = 2.0
    params["evaluate"]["fid_method"] = "eigh"  # evaluate reruns anyway; eigh spares it ~40 s of sqrtm
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh([sys.executable, "-m", "dvc", "repro", "evaluate"], dst, env)  # the FID's chain (not curves)
    assert sorted(ran(out)) == ["evaluate", "sample"], out
    metrics = json.loads((dst / "artifacts/eval/metrics.json").read_text())
    assert metrics["provenance"]["sampler"]["cfg_scale"] == 2.0
    assert metrics["provenance"]["fid_method"] == "eigh"


def _experiment_fids(node, under_exp=False):
    """Every numeric 'fid' found below an 'experiments' entry of `dvc exp show --json`."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "fid" and under_exp and isinstance(v, (int, float)):
                found.append(v)
            else:
                found += _experiment_fids(v, under_exp or k == "experiments")
    elif isinstance(node, list):
        for v in node:
            found += _experiment_fids(v, under_exp)
    return found


def test_dvc_experiments_carry_their_fid(repo):
    """metrics.json and train.jsonl are git-tracked (cache: false, un-ignored), so an experiment's commit
    holds them and `dvc exp show` has its FID and cost columns (not '!')."""
    dst, env, _ = repo
    sh(["git", "add", "-A"], dst, env)
    sh(["git", "commit", "-qm", "baseline results"], dst, env)
    out = sh([sys.executable, "-m", "dvc", "exp", "run", "evaluate", "-S", "sample.cfg_scale=3.0",
              "-S", "evaluate.fid_method=eigh"], dst, env)
    assert sorted(ran(out)) == ["evaluate", "sample"], out
    shown = json.loads(sh([sys.executable, "-m", "dvc", "exp", "show", "--json"], dst, env))
    fids = _experiment_fids(shown)
    assert fids and all(np.isfinite(f) for f in fids), json.dumps(shown)[:3000]
    assert "gflops" in json.dumps(shown)
