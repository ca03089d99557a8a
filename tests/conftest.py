import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Tests import the project from the checkout and run stages with the interpreter running pytest.
sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    """One JAX compilation cache for the whole run, made by the controlling process before the xdist workers
    start, so they and every stage subprocess they run inherit it: the tests run the same tiny stages (and
    the same compiled programs) dozens of times, and a cached program is the same executable, so no byte
    changes (`tests/test_end_to_end.py` and the resume tests compare bytes across runs either way). An
    existing JAX_COMPILATION_CACHE_DIR is kept as is."""
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    config._jax_cache = tempfile.mkdtemp(prefix="dit-tests-jax-cache-")
    # every program, however quick to compile; a size limit turns on JAX's file lock around each read and
    # write, so a process never reads an entry another is still writing
    os.environ.update(JAX_COMPILATION_CACHE_DIR=config._jax_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30))


def pytest_unconfigure(config):
    if getattr(config, "_jax_cache", None):
        shutil.rmtree(config._jax_cache, ignore_errors=True)


def without_device_count() -> dict:
    """An env update that drops any --xla_force_host_platform_device_count, so a stage's own
    `cpu_devices` param sets the CPU devices."""
    return {"XLA_FLAGS": " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)}


def run_stage(stage: str, cwd: Path, *args: str, env: dict | None = None, check: bool = True,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m stages.<stage>` in `cwd` (a copy of the project's params.yaml/dvc.yaml)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"stage {stage} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty run folder holding the project's params.yaml and dvc.yaml (stages write artifacts/ here)."""
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path
