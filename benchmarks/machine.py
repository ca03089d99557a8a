"""One line that says which machine a benchmark ran on: ratios differ by CPU (Intel vs AMD, AVX-512 or
not), so every benchmark prints this first."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name, with its family/model numbers and widest vector ISA: a VM often shows only
    "AMD EPYC", and this project's train step ran twice as long on a Zen 3 (family 25 model 1, AVX2) as on an
    AVX-512 EPYC of the same name."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break  # the first CPU's block is enough
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    flags = fields.get("flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{fields['model name']} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, {isa})"


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


def stage_cpu_devices(stage: str, devices: int | None = None, step_memory: bool = False) -> int:
    """Make XLA:CPU present `devices` devices, or as many as params.yaml's `<stage>.cpu_devices` (what the
    stage runs on CPU); with `step_memory`, also set malloc as the train stage does
    (dit.backend.keep_step_memory: process-wide, so a peer in the same process runs with it too). Returns
    the count. Call after pin_to_one_cpu and before any JAX work."""
    if devices is None:
        import yaml

        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "params.yaml")) as f:
            devices = int(yaml.safe_load(f)[stage]["cpu_devices"])
    from dit.backend import keep_step_memory, set_cpu_devices

    set_cpu_devices(devices)
    if step_memory:
        keep_step_memory()
    return devices
