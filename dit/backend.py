"""Per-backend compile choices, made in one place.

XLA:CPU hands convolutions to YNNPACK by default. On the convolutions this project runs -- Inception's
(few channels, large images) and the AutoencoderKL's (3x3, 128-512 channels, 256 px) -- that is slower
than XLA's Eigen convolutions: about 2x on Inception (benchmarks/bench_inception.py) and 1.2x on the VAE
encoder (benchmarks/bench_encode.py), with the same results to float32 rounding. Keeping YNNPACK for
single dots only restores Eigen for convolutions. GPU and TPU get XLA's defaults.

Eigen's convolutions split their work by the size of XLA's thread pool, which follows the CPUs a process
may run on: their last bits depend on the core count (not on the device or host count), one of the
reasons bytes are promised only across runs on the same kind of machine (README, determinism).

XLA:CPU puts an execution's temporaries in one block, malloc'ed and freed at every call: DiT-S/2's train
step has a 512 MB block a device. glibc serves a block that large by mmap (XLA's threads always do), so the
kernel zero-fills ~1 GB of fresh pages every step (up to 250,000 page faults). The train stage sets two
things that stop it; they change where buffers live, never the maths (the same bytes, tests/test_backend.py):
  - `step_compiler_options`: XLA's `xla_multiheap_size_constraint_per_heap` splits the temporaries into
    blocks just under 32 MB (a program whose temporaries fit one block, like the embedded default's step,
    compiles as before; XLA warns once for each single buffer larger than a block, and gives it a block
    of its own);
  - `keep_step_memory`: glibc's malloc serves blocks under 32 MB (its largest mmap threshold) from its
    heaps and keeps what is freed (fixed thresholds; glibc otherwise moves them as it goes, and returns
    free heaps to the kernel).
Together, on an AVX-512 Zen 5 EPYC (benchmarks/bench_train_step.py --plain-memory for the A/B): DiT-S/2's
step 977-1012 ms against 1149-1196, 1,500-3,500 page faults a step against 78,000-146,000 (16 MB blocks;
blocks just under 32 MB: 1,800); the process keeps ~300 MB more. Either alone helps less, and not
reliably (the split alone: 1,000-1,190 ms, 17,000-80,000 faults). The sampler is left as it was: its
program decodes with the VAE, whose single buffers are over a block (XLA's warnings), and splitting its
temporaries moved guided sampling by 1-4%.

On CPU the train and sample stages can split their work over several XLA:CPU devices (`set_cpu_devices`,
the `cpu_devices` params). Which count is faster depends on the work: the devices' programs share XLA's one
thread pool, so two devices on 2 cores contend for it, while one program splits each GEMM over both cores.
On a 2-core AVX-512 Zen 4 (2026-12-03): the embedded default's train step 41 ms on one device against 45 on
two, DiT-S/2's 1.81 s against 1.67; the sample stage (forward only, 250 samples a device) 27 s against
29-32 s on one.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

import jax
import numpy as np

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
CPU_STEP_OPTIONS = {"xla_multiheap_size_constraint_per_heap": (32 << 20) - (64 << 10)}  # under STEP_MALLOPT's 32 MB
# glibc mallopt(param, value): M_TRIM_THRESHOLD -1 (free memory kept up to 1 GB), M_TOP_PAD -2 (64 MB: a
# heap left empty is kept, not unmapped), M_MMAP_THRESHOLD -3 (32 MB, glibc's maximum: below it, no mmap)
STEP_MALLOPT = ((-1, 1 << 30), (-2, 64 << 20), (-3, 32 << 20))


def _accepted(options: dict) -> dict:
    """`options` if this XLA accepts them, else {} (XLA's defaults, correct too)."""
    try:
        with jax.default_device(jax.devices("cpu")[0]):
            jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
    except Exception:  # an XLA without an option rejects it at compile time
        return {}
    return dict(options)


@functools.cache
def cpu_compiler_options() -> dict:
    """CPU_OPTIONS if this XLA accepts them (the option is experimental), else {}."""
    return _accepted(CPU_OPTIONS)


@functools.cache
def cpu_step_options() -> dict:
    """CPU_STEP_OPTIONS if this XLA accepts them, else {}."""
    return _accepted(CPU_STEP_OPTIONS)


def _on_cpu(options: dict, platform: str | None) -> dict | None:
    return (options or None) if (platform or jax.default_backend()) == "cpu" else None


def conv_compiler_options(platform: str | None = None) -> dict | None:
    """`compiler_options` for a top-level jax.jit of a convolutional network on `platform`."""
    return _on_cpu(cpu_compiler_options(), platform)


def step_compiler_options(platform: str | None = None) -> dict | None:
    """`compiler_options` for the DiT's train step on `platform`."""
    return _on_cpu(cpu_step_options(), platform)


def keep_step_memory() -> bool:
    """Set STEP_MALLOPT in this process, for a process that runs one big XLA:CPU program over and over
    (the train stage). glibc only (elsewhere nothing is set); True if set. The values hold from the call on,
    for the whole process."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(param, value) == 1 for param, value in STEP_MALLOPT)


def set_cpu_devices(n: int) -> None:
    """Make XLA:CPU present `n` devices. Call before any JAX work; it changes only the CPU backend (a
    GPU/TPU host keeps its accelerators as the default devices). An explicit
    --xla_force_host_platform_device_count in XLA_FLAGS (tests, a user) wins."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    jax.config.update("jax_num_cpu_devices", int(n))
