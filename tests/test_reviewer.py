"""The reviewer's path, end to end (docs/publishing.md): an author runs the tiny DAG of test_end_to_end.py,
commits, pushes the git history to a bare origin and the data to (a) a local-folder DVC remote and (b) an S3
remote served by moto on loopback; a reviewer's `git clone` pulls and audits. Every author and reviewer
command's wall time is printed at the end (pytest -s, or -rP)."""

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_end_to_end import TINY, copy_project, git_commit_all, merge, sh

slow = pytest.mark.slow  # every test but the first three: they share one tiny `dvc repro` (about 2 min)

DVC, AUDIT = [sys.executable, "-m", "dvc"], [sys.executable, "-m", "stages.audit"]
# evaluate by eigh, whatever params.yaml says: the same chain, and each --recompute spares ~40 s of sqrtm
PARAMS = merge(copy.deepcopy(TINY), {"evaluate": {"fid_method": "eigh"}})
TIMES: dict[str, float] = {}
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def run(name: str, cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command, record its wall time under `name`, and (check) require exit 0."""
    t = time.time()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    TIMES[name] = round(time.time() - t, 1)
    assert not check or proc.returncode == 0, f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc


def test_environment_is_recorded_without_importing_jax():
    """A stage that never uses JAX does not import it for the record; the packages and the CPU are there."""
    code = ("import json, sys; from stages.runtime import environment; r = environment.record(); "
            "print(json.dumps({'jax_imported': 'jax' in sys.modules, **r}))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}).stdout)
    assert out["jax_imported"] is False and out["jax"] is None
    assert out["packages"]["jax"] and out["packages"]["numpy"] and out["packages"]["dvc"]
    assert out["cpu"] and out["cpu_cores"] >= 1 and set(out["env"]) == {"XLA_FLAGS", "LIBTPU_INIT_ARGS"}


def test_environment_diff_names_every_difference():
    from stages.runtime import environment

    now = environment.record()
    other = json.loads(json.dumps(now))
    other["packages"]["jax"], other["cpu_cores"], other["env"]["XLA_FLAGS"] = "0.0.1", 99, "--xla_x=1"
    assert environment.diff(now, now) == []
    assert environment.diff(other, now) == [f"cpu_cores 99 -> {now['cpu_cores']}",
                                            f"XLA_FLAGS --xla_x=1 -> {now['env']['XLA_FLAGS']}",
                                            f"jax 0.0.1 -> {now['packages']['jax']}"]
    assert environment.diff(None, now) == ["environment: not recorded (made before environments were recorded)"]


def test_audit_help_and_a_missing_metrics_file(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run(AUDIT + ["--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "--recompute" in proc.stdout and "--rev REV" in proc.stdout
    proc = subprocess.run(AUDIT, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: artifacts/eval/metrics.json: no such file")


@pytest.fixture(scope="module", autouse=True)
def report_times():
    yield
    if TIMES:
        print("\nwall times (s):\n" + "\n".join(f"  {k}: {v}" for k, v in TIMES.items()))


@pytest.fixture(scope="module")
def author(tmp_path_factory):
    """The author's repo after `dvc repro`, `git commit`, `git push` and `dvc push` to a local-folder remote."""
    base = tmp_path_factory.mktemp("reviewer")
    dst = base / "author"
    copy_project(dst)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    (dst / "params.yaml").write_text(yaml.safe_dump(merge(params, PARAMS), sort_keys=False))
    env = git_commit_all(dst, "tiny")
    sh(["git", "init", "-q", "--bare", str(base / "origin.git")], base, env)
    branch = sh(["git", "symbolic-ref", "--short", "HEAD"], dst, env).strip()
    sh(["git", "--git-dir", str(base / "origin.git"), "symbolic-ref", "HEAD", f"refs/heads/{branch}"], base, env)
    sh(["git", "remote", "add", "origin", str(base / "origin.git")], dst, env)
    sh(DVC + ["remote", "add", "-d", "store", str(base / "store")], dst, env)
    sh(["git", "commit", "-qam", "the DVC remote"], dst, env)  # before the run: a clean tree, so the code is a commit
    run("author: dvc repro", DVC + ["repro"], dst, env)
    sh(["git", "add", "-A"], dst, env)
    run("author: git commit", ["git", "commit", "-qm", "results"], dst, env)
    run("author: git push", ["git", "push", "-q", "origin", branch], dst, env)
    run("author: dvc push", DVC + ["push"], dst, env)
    return base, dst, env


def clone(author, name: str) -> tuple[Path, dict]:
    base, _, env = author
    rev = base / name
    run(f"reviewer: git clone ({name})", ["git", "clone", "-q", str(base / "origin.git"), str(rev)], base, env)
    return rev, {**env, "PYTHONPATH": str(rev)}


@pytest.fixture(scope="module")
def reviewer(author):
    """A reviewer's fresh clone after a bare `dvc pull` from the local-folder remote."""
    rev, env = clone(author, "reviewer")
    return rev, env, run("reviewer: dvc pull", DVC + ["pull"], rev, env)


@slow
def test_bare_pull_exits_0_and_fetches_the_main_pipeline(reviewer):
    rev, _, pull = reviewer
    for path in ("samples/samples.npz", "reference/reference.npz", "checkpoints/model.json", "latents",
                 "curves/curves.json", "eval/manifest.json"):
        assert (rev / "artifacts" / path).exists(), (path, pull.stdout + pull.stderr)
    assert not (rev / "released/artifacts").exists()  # the released pipeline never ran, and is not cached


@slow
def test_audit_holds_on_the_reviewer_clone(reviewer):
    rev, env, _ = reviewer
    proc = run("reviewer: stages.audit", AUDIT, rev, env)
    assert "orbax step 12 EMA weights" in proc.stdout and "not pulled" not in proc.stdout, proc.stdout
    assert "recorded (evaluate)" in proc.stdout and "cpu_cores" in proc.stdout


@slow
def test_recompute_gives_the_same_bytes(reviewer):
    rev, env, _ = reviewer
    proc = run("reviewer: stages.audit --recompute", AUDIT + ["--recompute"], rev, env)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("recompute fid ")]
    assert rows and "(same environment: bytes)" in rows[0] and rows[0].endswith("yes"), proc.stdout


@slow
def test_recompute_on_another_core_count_is_within_the_tolerance(reviewer):
    """One core in place of the author's: XLA:CPU splits the Inception convolutions' sums otherwise, so the
    features differ by rounding; the environment diff names it, and the FID lies within the bound."""
    cores = len(os.sched_getaffinity(0))
    if cores < 2 or not shutil.which("taskset"):
        pytest.skip("needs taskset and 2 cores, to run on fewer cores than the author")
    rev, env, _ = reviewer
    pin = ["taskset", "-c", str(min(os.sched_getaffinity(0)))]
    proc = run("reviewer: stages.audit --recompute (1 core)", pin + AUDIT + ["--recompute"], rev, env)
    print("\n".join(line for line in proc.stdout.splitlines() if "WARNING" in line or "recompute" in line))
    assert f"WARNING: environment: evaluate ran with cpu_cores {cores} -> 1" in proc.stdout, proc.stdout
    fid = next(line for line in proc.stdout.splitlines() if line.startswith("recompute fid "))
    assert "(another environment)" in fid and fid.endswith("yes"), fid


@slow
def test_rev_that_does_not_exist_is_one_line_exit_2(reviewer):
    rev, env, _ = reviewer
    proc = run("reviewer: stages.audit --rev (missing)", AUDIT + ["--rev", "no-such-rev"], rev, env, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --rev no-such-rev: no such git revision or DVC experiment"], proc.stderr
    proc = run("reviewer: stages.audit --rev HEAD", AUDIT + ["--rev", "HEAD"], rev, env)
    assert "at HEAD to the data holds" in proc.stdout


@slow
def test_tampered_remote_object_is_named_by_the_audit_after_a_pull(author):
    """DVC does not rehash what it pulls: a byte flipped in the remote's copy of samples.npz reaches the
    reviewer's workspace, and the audit names it."""
    base, dst, env = author
    tampered = base / "tampered"
    shutil.copytree(base / "store", tampered)
    lock = yaml.safe_load((dst / "dvc.lock").read_text())["stages"]["sample"]["outs"]
    dir_md5 = next(o["md5"] for o in lock if o["path"] == "artifacts/samples")
    files = json.loads((dst / ".dvc/cache/files/md5" / dir_md5[:2] / dir_md5[2:]).read_text())
    md5 = next(f["md5"] for f in files if f["relpath"] == "samples.npz")
    obj = tampered / "files/md5" / md5[:2] / md5[2:]
    os.chmod(obj, 0o644)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.write_bytes(bytes(data))
    rev, renv = clone(author, "reviewer-tampered")
    sh(DVC + ["remote", "modify", "--local", "store", "url", str(tampered)], rev, renv)
    run("reviewer: dvc pull (tampered remote)", DVC + ["pull"], rev, renv)
    proc = run("reviewer: stages.audit (tampered)", AUDIT, rev, renv, check=False)
    assert proc.returncode == 1 and "FAILED at 'metrics <- samples.npz'" in proc.stderr, proc.stdout + proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(author):
    """moto's S3 on loopback, a bucket in it, and the author's data pushed there (`dvc push -r s3`)."""
    pytest.importorskip("moto.server")
    pytest.importorskip("dvc_s3")
    import boto3

    base, dst, env = author
    port = _free_port()
    env = {**env, **S3_ENV}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=url, region_name=S3_ENV["AWS_DEFAULT_REGION"],
                     aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="dit")
        sh(DVC + ["remote", "add", "s3", "s3://dit/store"], dst, env)
        sh(DVC + ["remote", "modify", "s3", "endpointurl", url], dst, env)
        sh(["git", "commit", "-qam", "the S3 remote"], dst, env)
        sh(["git", "push", "-q", "origin", "HEAD"], dst, env)
        run("author: dvc push -r s3", DVC + ["push", "-r", "s3"], dst, env)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


@slow
def test_s3_bare_pull_then_audit(author, s3):
    rev, env = clone(author, "reviewer-s3")
    env = {**env, **S3_ENV}
    run("reviewer: dvc pull -r s3", DVC + ["pull", "-r", "s3"], rev, env)
    run("reviewer: stages.audit (after the S3 pull)", AUDIT, rev, env)


@slow
def test_s3_targeted_pull_of_one_fid_then_audit(author, s3):
    """What one FID needs, not the latents nor every kept checkpoint: the audit checks the rest against
    dvc.lock ("not pulled"), within 5 minutes for pull + audit."""
    from stages.tools.revision import fid_targets

    rev, env = clone(author, "reviewer-s3-fid")
    env = {**env, **S3_ENV}
    step = json.loads((rev / "artifacts/eval/metrics.json").read_text())["provenance"]["checkpoint_step"]
    run("reviewer: dvc pull -r s3 <one FID>", DVC + ["pull", "-r", "s3", *fid_targets(step)], rev, env)
    assert not (rev / "artifacts/latents").exists() and not (rev / "artifacts/checkpoints/kept").exists()
    proc = run("reviewer: stages.audit (one FID pulled)", AUDIT, rev, env)
    assert "train <- latents (artifacts/latents): dvc.lock artifacts/latents" in proc.stdout, proc.stdout
    assert "partly pulled" in proc.stdout and "orbax step 12 EMA weights" in proc.stdout
    assert TIMES["reviewer: dvc pull -r s3 <one FID>"] + TIMES["reviewer: stages.audit (one FID pulled)"] < 300


@slow
def test_experiment_fid_audited_by_rev_on_a_clone_that_pulled_nothing(author):
    """A `dvc exp` row: the author runs and pushes an experiment; the reviewer fetches its git ref only, and
    `--rev NAME` fetches what its FID needs from the DVC remote into the cache, workspace untouched."""
    base, dst, env = author
    run("author: dvc exp run", DVC + ["exp", "run", "-n", "cfg3", "evaluate", "-S", "sample.cfg_scale=3.0"],
        dst, env)
    run("author: dvc exp push", DVC + ["exp", "push", "origin", "cfg3"], dst, env)
    rev, env = clone(author, "reviewer-exp")
    run("reviewer: dvc exp pull --no-cache", DVC + ["exp", "pull", "--no-cache", "origin", "cfg3"], rev, env)
    proc = run("reviewer: stages.audit --rev cfg3", AUDIT + ["--rev", "cfg3"], rev, env)
    assert "at cfg3 to the data holds" in proc.stdout and "+ params" in proc.stdout, proc.stdout
    assert not (rev / "artifacts/samples").exists()  # the workspace is untouched
    # the same with a remote that is not there, and nothing in the cache: one line, exit 2
    shutil.rmtree(rev / ".dvc/cache", ignore_errors=True)
    sh(DVC + ["remote", "modify", "--local", "store", "url", str(base / "gone")], rev, env)
    proc = run("reviewer: stages.audit --rev cfg3 (no remote)", AUDIT + ["--rev", "cfg3"], rev, env, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "remote 'store'" in proc.stderr
