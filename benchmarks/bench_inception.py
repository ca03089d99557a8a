"""Inception-2015-12-05 feature throughput: ours (JAX, jit) vs the TorchScript translation in torch, on the
same images in the same run. Prints img/s for both and ours / torch (goal >= 1).

Both do the same work per image: 299x299 uint8 -> (x - 128) / 128 -> the network -> pool_3 (ours also
returns the mixed_6 spatial features, which cost nothing extra). Our compile time is reported apart.
On CPU ours is compiled with `dit.backend.CPU_OPTIONS` (XLA's Eigen convolutions instead of its
YNNPACK ones); the line "XLA options" shows what was used.

--onednn sets `--xla_cpu_use_onednn=true` before JAX starts (features stay bit-identical); on the shared
2-core development machine its effect was within the run-to-run noise, so it is off by default.

    python benchmarks/bench_inception.py [--images 64] [--batch-size 16] [--repeats 3] [--onednn]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe  # noqa: E402


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    print(describe(), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--onednn", action="store_true", help="XLA_FLAGS=--xla_cpu_use_onednn=true")
    args = ap.parse_args()
    if args.onednn and "xla_cpu_use_onednn" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_onednn=true").strip()

    import jax
    import torch

    from dit.backend import conv_compiler_options, cpu_compiler_options
    from metrics.inception import InceptionV3

    images = np.random.default_rng(0).integers(0, 256, (args.images, 299, 299, 3), dtype=np.uint8)
    b = args.batch_size

    ours = InceptionV3.load(compiler_options=conv_compiler_options())
    t0 = time.perf_counter()
    ours.features(images[:b], batch_size=b)  # compiles resize + network for this batch shape
    compile_s = time.perf_counter() - t0
    ours_s = best_time(lambda: ours.features(images, batch_size=b), args.repeats)

    model = torch.jit.load(ours.path, map_location="cpu").eval()

    def run_torch():
        with torch.no_grad():
            for i in range(0, len(images), b):
                x = torch.from_numpy(images[i:i + b]).permute(0, 3, 1, 2).float()
                model((x - 128) / 128)

    with torch.no_grad():  # TorchScript's profiling executor optimises during its first calls
        for _ in range(2):
            model(torch.zeros(b, 3, 299, 299))
    torch_s = best_time(run_torch, args.repeats)

    n = len(images)
    print(f"device: {jax.devices()[0].platform} x{len(jax.devices())}, torch threads {torch.get_num_threads()}, "
          f"{n} images of 299x299, batch {b}, best of {args.repeats}, "
          f"XLA_FLAGS='{os.environ.get('XLA_FLAGS', '')}'")
    if jax.devices()[0].platform == "cpu":
        print(f"XLA options for ours: {cpu_compiler_options() or 'defaults (this XLA lacks the option)'}")
    print(f"ours (JAX):   compile+first batch {compile_s:.1f} s, steady {n / ours_s:.2f} img/s")
    print(f"torch (TorchScript): {n / torch_s:.2f} img/s")
    print(f"ratio ours / torch: {torch_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
