"""One line that says which machine a benchmark ran on: ratios differ by CPU (Intel vs AMD, AVX-512 or
not), so every benchmark prints this first."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    return (f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.machine()}, "
            f"Python {platform.python_version()}")
