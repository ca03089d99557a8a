"""Per-backend compile choices, made in one place.

XLA:CPU hands convolutions to YNNPACK by default. On the convolutions this project runs -- Inception's
(few channels, large images) and the AutoencoderKL's (3x3, 128-512 channels, 256 px) -- that is slower
than XLA's Eigen convolutions: about 2x on Inception (benchmarks/bench_inception.py) and 1.2x on the VAE
encoder (benchmarks/bench_encode.py), with the same results to float32 rounding. Keeping YNNPACK for
single dots only restores Eigen for convolutions. GPU and TPU get XLA's defaults.

Eigen's convolutions split their work by the size of XLA's thread pool, which follows the CPUs a process
may run on: their last bits depend on the core count (not on the device or host count), one of the
reasons bytes are promised only across runs on the same kind of machine (README, determinism).

On CPU the train and sample stages also split their work over several XLA:CPU devices
(`set_cpu_devices`): XLA:CPU parallelises one program's small ops poorly across cores, and data
parallelism over one device per core does better (the embedded default's step: 69 ms on one device,
45 ms on two, on 2 cores).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def cpu_compiler_options() -> dict:
    """CPU_OPTIONS if this XLA accepts them (the option is experimental), else {} (XLA's defaults)."""
    try:
        with jax.default_device(jax.devices("cpu")[0]):
            jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(np.float32(0)).compile()
    except Exception:  # an XLA without the option rejects it at compile time; defaults are correct too
        return {}
    return dict(CPU_OPTIONS)


def conv_compiler_options(platform: str | None = None) -> dict | None:
    """`compiler_options` for a top-level jax.jit of a convolutional network on `platform`."""
    return (cpu_compiler_options() or None) if (platform or jax.default_backend()) == "cpu" else None


def set_cpu_devices(n: int) -> None:
    """Make XLA:CPU present `n` devices. Call before any JAX work; it changes only the CPU backend (a
    GPU/TPU host keeps its accelerators as the default devices). An explicit
    --xla_force_host_platform_device_count in XLA_FLAGS (tests, a user) wins."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    jax.config.update("jax_num_cpu_devices", int(n))
