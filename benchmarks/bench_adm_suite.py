"""The whole ADM suite, timed as an ImageNet evaluation runs it: N samples against a published-style
reference batch, through Inception and all five numbers.

The paper's protocol is 50,000 samples at 256 px against ADM's VIRTUAL_imagenet256_labeled.npz (10,000
images in arr_0 plus mu/sigma/mu_s/sigma_s). This script writes batches of those shapes (random pixels;
the content does not change the work), then times `metrics.adm.evaluate` end to end: Inception over the
samples and the reference images (sharded over every device), the FID/sFID square roots, IS and
precision/recall. Writing the batches is not timed. The goal on one H100 is 50,000 images in under 2
minutes; on a CPU use small numbers (the defaults) for a smoke run.

There is no peer in this run: ADM's TensorFlow evaluator needs classify_image_graph_def.pb, which cannot
be downloaded here. bench_inception.py compares the Inception part with the TorchScript model.

    python benchmarks/bench_adm_suite.py [--samples 50000] [--reference 10000] [--size 256]
                                         [--batch-size 500] [--fid-method sqrtm|eigh] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402


def random_images(rng, n: int, size: int, chunk: int = 1000) -> np.ndarray:
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(0, n, chunk):
        out[i:i + chunk] = rng.integers(0, 256, out[i:i + chunk].shape, dtype=np.uint8)
    return out


def write_batches(workdir: Path, samples: int, reference: int, size: int) -> tuple[Path, Path]:
    """samples.npz (arr_0) and an ADM-style ref.npz (arr_0 + statistics, no metadata)."""
    from metrics.adm import POOL_DIM, SPATIAL_DIM, statistics

    rng = np.random.default_rng(0)
    ref, smp = workdir / "ref.npz", workdir / "samples.npz"
    feats = {d: rng.standard_normal((2 * d + 100, d)).astype(np.float32) for d in (POOL_DIM, SPATIAL_DIM)}
    (mu, sigma), (mu_s, sigma_s) = (statistics(feats[d]) for d in (POOL_DIM, SPATIAL_DIM))
    np.savez(ref, arr_0=random_images(rng, reference, size), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    np.savez(smp, arr_0=random_images(rng, samples, size))
    return ref, smp


def main(argv=None) -> int:
    print(describe(), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--reference", type=int, default=100)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=100, help="images per Inception call, all devices")
    ap.add_argument("--fid-method", default="sqrtm", choices=["sqrtm", "eigh"])
    ap.add_argument("--workdir", default=None, help="where to write the batches (default: a temp dir)")
    args = ap.parse_args(argv)

    import jax

    from metrics import adm
    from dit.backend import conv_compiler_options
    from metrics.inception import InceptionV3

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t0 = time.perf_counter()
        ref, smp = write_batches(Path(tmp), args.samples, args.reference, args.size)
        write_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        inception = InceptionV3.load(compiler_options=conv_compiler_options())
        warm = np.zeros((args.batch_size, args.size, args.size, 3), np.uint8)
        inception.features(warm, batch_size=args.batch_size)  # compile resize + network for this shape
        compile_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        res = adm.evaluate(ref, smp, inception, batch_size=args.batch_size, fid_method=args.fid_method)
        suite_s = time.perf_counter() - t0

    n = args.samples + args.reference
    devices = jax.devices()
    print(f"devices: {len(devices)} x {devices[0].device_kind}; {args.samples} samples + {args.reference} "
          f"reference images at {args.size} px; Inception batch {args.batch_size}; FID by {args.fid_method}")
    print(f"writing the batches (not timed): {write_s:.1f} s; Inception load + compile: {compile_s:.1f} s")
    print(f"whole suite: {suite_s:.1f} s wall ({n / suite_s:.1f} images/s through Inception and the metrics)")
    print("numbers (random pixels, so meaningless):", json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
