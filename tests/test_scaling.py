"""The scaling study: the report (stages.tools.scaling) on synthetic rows, and a smoke sweep of 2 tiny configs
through the real DVC experiment machinery (stages.tools.sweep -> dvc exp run --temp) in a copy of the repo."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from stages.tools import scaling, scaling_figures

# ------------------------------------------------------------------------------------ the report, fast


def row(name, gflops, fid, ref="r1", inc="i1", steps=100, patch=2):
    return {"name": name, "status": "ok", "reason": None, "rev": "0" * 40, "model": "d2-w64", "block":
            "adaln_zero", "patch": patch, "config": f"d2-w64/{patch} adaln_zero", "params": 1000,
            "gflops": gflops, "train_compute": gflops * 3 * 64 * steps, "steps": steps, "fid": fid,
            "sfid": None, "precision": None, "recall": None, "is": None, "rfid": 30.0, "fid_floor": 9.0,
            "reference_sha256": ref, "inception_sha256": inc}


def test_report_fits_slope_and_spearman_and_is_byte_stable(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling_figures, "read_samples", lambda rev, n: (_ for _ in ()).throw(FileNotFoundError("gone")))
    rows = [row("a", 0.001, 100.0), row("b", 0.01, 50.0), row("c", 0.1, 25.0),
            {"name": "d", "status": "missing", "reason": "experiment queued", "rev": None}]
    doc, _ = scaling.report(rows, tmp_path)
    fit = doc["fit_fid_on_gflops"]
    assert fit["n"] == 3 and fit["spearman"] == -1.0 and abs(fit["slope"] - (-0.30103)) < 1e-4
    assert doc["missing"] == [{"name": "d", "reason": "experiment queued"}]
    assert doc["figures"] == ["fid_vs_compute.png", "fid_vs_gflops.png", "fid_vs_steps.png"]
    assert [s["name"] for s in doc["grid"]["skipped"]] == ["a", "b", "c"]  # named, not dropped
    tsv = (tmp_path / "scaling.tsv").read_text().splitlines()  # for dvc plots
    assert tsv[0].split("\t")[:4] == ["name", "config", "params", "gflops"] and len(tsv) == 4
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    scaling.report(rows, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first
    assert all(b"matplotlib" not in v for v in first.values())


def test_report_draws_the_curves_of_runs_that_have_them(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling_figures, "read_samples", lambda rev, n: (_ for _ in ()).throw(FileNotFoundError("gone")))
    curve = {"curve_samples": 250, "curve_steps": [{"step": 1000, "fid": 120.0}, {"step": 2000, "fid": 90.0}],
             "curve_sampling": [{"sampler": "dpm++10", "sample_gflops_per_image": 0.2, "fid": 110.0},
                                {"sampler": "100", "sample_gflops_per_image": 2.0, "fid": 95.0}]}
    rows = [row("a", 0.001, 100.0) | curve, row("b", 0.01, 50.0)]  # b: a pipeline without the curves stage
    doc, _ = scaling.report(rows, tmp_path)
    assert {"fid_over_training.png", "fid_vs_sampling_compute.png"} <= set(doc["figures"])
    assert (tmp_path / "fid_vs_sampling_compute.png").read_bytes()[:4] == b"\x89PNG"
    assert scaling._tsv("sampler\tsampling_steps\tfid\n100\t100\t9.5\n") == [
        {"sampler": "100", "sampling_steps": 100, "fid": 9.5}]


def test_report_refuses_fid_figures_across_measurement_protocols(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling_figures, "read_samples", lambda rev, n: (_ for _ in ()).throw(FileNotFoundError("gone")))
    (tmp_path / "fid_vs_gflops.png").write_bytes(b"old")
    rows = [row("a", 0.001, 100.0), row("b", 0.01, 50.0, ref="r2"), row("c", 0.1, 25.0, inc="i2"),
            row("d", 0.1, 20.0) | {"num_samples": 500}, row("e", 0.1, 20.0) | {"sampler": "ddim50"},
            row("f", 0.1, 20.0) | {"cfg_scale": 1.5}]  # FIDs measured with other samples, sampler, guidance
    doc, groups = scaling.report(rows, tmp_path)
    assert not doc["comparable"] and doc["figures"] == [] and doc["fit_fid_on_gflops"] is None
    assert sorted(g["experiments"] for g in groups) == [["a"], ["b"], ["c"], ["d"], ["e"], ["f"]]
    assert not (tmp_path / "fid_vs_gflops.png").exists()  # no stale, incomparable figure left behind


def test_yardsticks_without_upstream_is_one_line(workdir):
    from conftest import run_stage

    proc = run_stage("yardsticks", workdir, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "artifacts/" in proc.stderr


def test_yardstick_images_are_evenly_spaced_and_capped():
    from stages.yardsticks import pick

    assert pick(10, 3).tolist() == [0, 4, 9] and pick(5, 500).tolist() == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------- the smoke sweep, slow

TINY = {
    "data": {"limit": 40},
    "vae": {"steps": 10, "batch_size": 16},
    "encode": {"shards": 2, "batch_size": 16, "num_workers": 1},
    "train": {"steps": 4, "global_batch_size": 8, "log_every": 2, "ckpt_every": 4, "keep_every": 2},
    "sample": {"num_samples": 10, "num_sampling_steps": "2", "batch_size": 10, "grid_per_class": 1},
    "curves": {"enabled": True, "num_samples": 10, "train_sampler": "2", "samplers": ["2", "ddim4"]},
    "reference": {"max_images": 20},
    "evaluate": {"batch_size": 20, "fid_method": "eigh"},  # ADM's sqrtm is the e2e test's; eigh: 5-8x faster
}
SMOKE = {"description": "two tiny configs", "set": {"train.hidden_size": 32, "train.num_heads": 2},
         "configs": {"smoke-d1-p4": {"train.depth": 1, "train.patch_size": 4},
                     "smoke-d2-p2": {"train.depth": 2, "train.patch_size": 2}}}


def merge(base, over):
    for k, v in over.items():
        base[k] = merge(base[k], v) if isinstance(v, dict) else v
    return base


def sh(cmd, cwd, env, ok=True):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, f"{' '.join(map(str, cmd))} -> {proc.returncode}:\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    dst = tmp_path_factory.mktemp("sweep") / "repo"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
        ".venv", ".git", "artifacts", "__pycache__", ".pytest_cache", "cache", "tmp", "*.egg-info", "dvc.lock"))
    params = yaml.safe_load((dst / "params.yaml").read_text())
    (dst / "params.yaml").write_text(yaml.safe_dump(merge(params, TINY), sort_keys=False))
    (dst / "sweeps/smoke.yaml").write_text(yaml.safe_dump(SMOKE, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(dst), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        sh(cmd, dst, env)
    out = sh([sys.executable, "-m", "stages.sweep", "smoke"], dst, env)
    return dst, env, out




@pytest.mark.slow
def test_smoke_sweep_runs_both_experiments_sharing_the_upstream_stages(swept):
    dst, env, out = swept
    assert "sweep: smoke-d1-p4 ok" in out and "sweep: smoke-d2-p2 ok" in out, out[-4000:]
    for stage in ("data", "vae", "encode", "reference", "yardsticks"):  # computed once, then from DVC's run cache
        assert len(re.findall(rf"Running stage '{stage}'", out)) == 1, (stage, out[-4000:])
    assert len(re.findall(r"Running stage 'train'", out)) == 2
    assert sh(["git", "status", "--porcelain"], dst, env) == ""  # --temp: the workspace is left as it was
    again = sh([sys.executable, "-m", "stages.sweep", "smoke", "--no-report"], dst, env)
    assert again.count("finished before; kept") == 2 and "Running stage" not in again


@pytest.mark.slow
def test_smoke_sweep_report_has_both_rows_with_dit_flops_gflops(swept):
    from dit.flops import count_flops, count_params
    from dit.models import dit_config

    dst, _, out = swept
    doc = json.loads((dst / "artifacts/scaling-smoke/scaling.json").read_text())
    rows = {r["name"]: r for r in doc["experiments"]}
    assert sorted(rows) == ["smoke-d1-p4", "smoke-d2-p2"] and not doc["missing"]
    for name, depth, patch in (("smoke-d1-p4", 1, 4), ("smoke-d2-p2", 2, 2)):
        r = rows[name]
        config = dit_config(None, depth=depth, hidden_size=32, num_heads=2, patch_size=patch, input_size=8,
                            in_channels=4, num_classes=10)
        assert r["status"] == "ok" and r["patch"] == patch and r["model"] == f"d{depth}-w32"
        assert r["gflops"] == pytest.approx(count_flops(config) / 1e9, rel=1e-9)
        assert r["params"] == count_params(config) and r["steps"] == 4
        assert r["train_compute"] == pytest.approx(r["gflops"] * 3 * 8 * 4, rel=1e-9)
        assert r["fid"] > 0 and r["fid_method"] == "eigh" and r["reference_sha256"] and r["inception_sha256"]
        assert 0 < r["fid_floor"] and 0 < r["rfid"]  # the yardsticks, shared by both experiments
        assert [p["step"] for p in r["curve_steps"]] == [2, 4]  # the kept EMAs, from the curves stage
        assert [p["sampler"] for p in r["curve_sampling"]] == ["2", "ddim4"]
        assert r["curve_sampling"][0]["sample_gflops_per_image"] == pytest.approx(r["gflops"] * 2 * 2)
    assert rows["smoke-d1-p4"]["rfid"] == rows["smoke-d2-p2"]["rfid"]
    assert doc["figures"] == ["fid_over_training.png", "fid_vs_compute.png", "fid_vs_gflops.png",
                              "fid_vs_sampling_compute.png", "fid_vs_steps.png", "samples_grid.png"]
    assert doc["grid"] == {"experiments": ["smoke-d1-p4", "smoke-d2-p2"], "skipped": []}
    for f in doc["figures"]:
        assert (dst / "artifacts/scaling-smoke" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Spearman" in out


@pytest.mark.slow
def test_second_report_changes_nothing_and_lists_a_missing_experiment(swept):
    dst, env, _ = swept
    folder = dst / "artifacts/scaling-smoke"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    sh([sys.executable, "-m", "stages.scaling", "--sweep", "smoke", "--out", "artifacts/scaling-smoke"], dst, env)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    out = sh([sys.executable, "-m", "stages.scaling", "--exps", "smoke-d1-p4", "smoke-d2-p2", "smoke-never",
              "--out", "artifacts/scaling-missing"], dst, env)
    doc = json.loads((dst / "artifacts/scaling-missing/scaling.json").read_text())
    assert [r["name"] for r in doc["experiments"]] == ["smoke-d1-p4", "smoke-d2-p2", "smoke-never"]
    assert doc["missing"] == [{"name": "smoke-never",
                               "reason": "not found in dvc exp show (never run, or removed)"}]
    assert "missing: smoke-never" in out


@pytest.mark.slow
def test_a_finished_experiment_with_other_params_is_rerun_not_kept(swept):
    """`-S train.steps=N` after a sweep: the finished experiments hold other values, so each is rerun (here a
    dry run: the commands are printed with -f, nothing runs) and the differing param is named."""
    dst, env, _ = swept
    out = sh([sys.executable, "-m", "stages.sweep", "smoke", "--dry-run", "-S", "train.steps=7"], dst, env)
    said = [l for l in out.splitlines() if "finished with other params" in l]
    assert len(said) == 2 and all("train.steps" in l and "-> 7" in l for l in said), out
    assert out.count("$ dvc exp run --temp") == 2 and "-S train.steps=7" in out and "Running stage" not in out
    kept = sh([sys.executable, "-m", "stages.sweep", "smoke", "--dry-run"], dst, env)
    assert kept.count("finished before; kept") == 2 and "$ dvc" not in kept
