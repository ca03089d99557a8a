"""One line that says which machine a benchmark ran on: ratios differ by CPU (Intel vs AMD, AVX-512 or
not), so every benchmark prints this first."""

from __future__ import annotations

import os
import platform

from stages.runtime.common import cpu_model  # noqa: F401  (the benchmarks import it from here)


def describe() -> str:
    return (f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.machine()}, "
            f"Python {platform.python_version()}")


def pin_to_one_cpu() -> int:
    """Hold this process (and the threads XLA and torch start later) to one CPU; returns it. Call before
    jax is imported: XLA:CPU sizes its thread pool by the CPUs a process may use, and
    `--xla_cpu_multi_thread_eigen=false` no longer makes it single-threaded."""
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def params_cpu_devices(stage: str, params_file: str = "params.yaml") -> int:
    """`<stage>.cpu_devices` of a params file at the project root: the XLA:CPU devices that stage runs on."""
    import yaml

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", params_file)) as f:
        return int(yaml.safe_load(f)[stage]["cpu_devices"])


def stage_cpu_devices(stage: str, devices: int | None = None, step_memory: bool = False) -> int:
    """Make XLA:CPU present `devices` devices, or as many as params.yaml's `<stage>.cpu_devices` (what the
    stage runs on CPU); with `step_memory`, also set malloc as the train stage does
    (dit.backend.keep_step_memory: process-wide, so a peer in the same process runs with it too). Returns
    the count. Call after pin_to_one_cpu and before any JAX work."""
    if devices is None:
        devices = params_cpu_devices(stage)
    from dit.backend import keep_step_memory, set_cpu_devices

    set_cpu_devices(devices)
    if step_memory:
        keep_step_memory()
    return devices
