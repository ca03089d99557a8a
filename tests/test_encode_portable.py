"""The encode job on Beam's portable Fn API path, the one Dataflow, Flink and Spark take: submitted with
PortableRunner to a job service this test starts, run by SDK worker processes from a worker pool this test
starts (environment EXTERNAL), sharing nothing with the launching process but the files. Its shards are
byte-identical to DirectRunner's: every VAE call has the same padded batch shape on both."""

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_encode_storage import shard_bytes, write_images
from test_encode import tiny_vae

pytestmark = pytest.mark.slow  # a Beam portable runner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


@pytest.fixture
def job_service(tmp_path):
    """(job service port, worker pool port, their log files); both processes are stopped afterwards."""
    # The SDK workers import pipelines/ and dit/; the pool starts them as `python -c ...` from PATH.
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    job_port, pool_port = free_port(), free_port()
    logs = [tmp_path / "job_service.log", tmp_path / "worker_pool.log"]
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(log, "w"))
             for log, (module, args) in zip(logs, [
                 ("apache_beam.runners.portability.local_job_service_main", [f"--port={job_port}"]),
                 ("apache_beam.runners.worker.worker_pool_main", [f"--service_port={pool_port}"])])]
    try:
        wait_for_port(job_port, procs[0])
        wait_for_port(pool_port, procs[1])
        yield job_port, pool_port, logs
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_portable_runner_writes_direct_runner_bytes(tmp_path, job_service):
    from pipelines.encode import run
    from pipelines.sources import file_units

    job_port, pool_port, logs = job_service
    rels = write_images(tmp_path / "images")
    tiny_vae(tmp_path / "vae")
    items = [(i, str(tmp_path / "images" / rel), i % 2, rel) for i, rel in enumerate(rels)]
    args = dict(image_size=16, batch_size=4, num_shards=2, flip=True, dtype="float32")
    for name in ("direct", "portable"):
        (tmp_path / name).mkdir()
    direct = run(file_units(items, 4), str(tmp_path / "vae"), str(tmp_path / "direct"), **args)
    portable = run(file_units(items, 4), str(tmp_path / "vae"), str(tmp_path / "portable"), **args,
                   runner="PortableRunner",
                   extra_options=[f"--job_endpoint=127.0.0.1:{job_port}", "--environment_type=EXTERNAL",
                                  f"--environment_config=127.0.0.1:{pool_port}"])
    assert portable == direct and len(direct[0]) == 2 and [s["item"] for s in direct[1]] == ["c1/gone.png"]
    a, b = shard_bytes(tmp_path / "direct"), shard_bytes(tmp_path / "portable")
    assert a == b and len(a) == 2
    # the job went through the job service and ran in a worker the pool started
    assert "with state DONE" in logs[0].read_text() and "Starting worker" in logs[1].read_text()
