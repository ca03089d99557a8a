"""The reference stage taking a published ADM batch as it is, and refusing a bad one in one line."""

import json

import numpy as np
import pytest

from conftest import run_stage
from stages.runtime.common import sha256_file


pytestmark = pytest.mark.slow  # each test runs the reference stage in a process (5 s each)

def adm_batch(path, size=32, mu=None):
    rng = np.random.default_rng(0)
    np.savez(path, arr_0=rng.integers(0, 256, (5, size, size, 3), dtype=np.uint8),
             mu=np.zeros(2048) if mu is None else mu, sigma=np.eye(2048),
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    return path


def test_adm_batch_is_checked_copied_and_hashed(workdir, tmp_path):
    src = adm_batch(tmp_path / "VIRTUAL_fake.npz")
    run_stage("reference", workdir, "--set", f"reference.adm_batch={src}")
    out = workdir / "artifacts/reference"
    assert sha256_file(out / "reference.npz") == sha256_file(src)
    m = json.loads((out / "manifest.json").read_text())
    assert m["inputs_sha256"]["adm_batch"] == sha256_file(src)
    assert m["input_paths"]["adm_batch"]["path"] == src.as_posix()
    assert m["counts"]["processed"] == 5 and m["statistics"] == ["mu", "mu_s", "sigma", "sigma_s"]


@pytest.mark.parametrize("make, needle", [
    (lambda p: adm_batch(p, size=64), "64x64"),
    (lambda p: adm_batch(p, mu=np.full(2048, np.nan)), "mu"),
    (lambda p: (np.savez(p, arr_0=np.zeros((2, 32, 32, 3), np.float32)), p)[1], "dtype"),
    (lambda p: (np.savez(p, arr_0=np.array([{"a": 1}], dtype=object)), p)[1], "object"),
    (lambda p: p, "does not exist"),
])
def test_bad_adm_batch_is_one_line_and_nothing_written(workdir, tmp_path, make, needle):
    src = make(tmp_path / "ref.npz")
    proc = run_stage("reference", workdir, "--set", f"reference.adm_batch={src}", check=False)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and needle in line and "ref.npz" in line, proc.stderr
    assert not (workdir / "artifacts/reference").exists()
