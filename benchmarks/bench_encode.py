"""Encode throughput: the Beam job against a plain PyTorch loop with diffusers' AutoencoderKL, and scaling.

Both sides get the SD VAE config (sd-vae-ft-ema's shape) with the same random weights (converted), the same
256 px images read and centre-cropped the same way, and the same batch; both report end-to-end images/s
(decode + encode; the Beam job also writes its shards). The Beam job is timed cold (its JIT compile
included) and warm (XLA's persistent compilation cache filled by the cold run).

The job is run as the encode stage runs it by default (DirectRunner, 2 worker processes) and in one process
(`in_memory`, 1 worker).

Scaling: DirectRunner multi_processing with 1 and then 2 workers, each worker process pinned to a CPU of its
own (worker k to the k-th CPU this process may use, through a `sitecustomize` hook keyed by Beam's WORKER_ID),
warm cache; the ratio is 2 workers / 1. Pinning is what holds a worker to one thread: XLA:CPU sizes its thread
pool by the CPUs a process may run on (`--xla_cpu_multi_thread_eigen=false` no longer changes it), so an
unpinned worker uses every core and 2 workers would only share them.

    python benchmarks/bench_encode.py [--images 32] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import cpu_model  # noqa: E402

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1"}
PIN_HOOK = """import os
if os.environ.get("BENCH_PIN_WORKERS") and os.environ.get("WORKER_ID", "").startswith("worker_"):
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[int(os.environ["WORKER_ID"].split("_")[1]) % len(cpus)]
    os.sched_setaffinity(0, {cpu})
    with open(os.environ["BENCH_PIN_WORKERS"], "a") as f:
        f.write(f"{os.environ['WORKER_ID']} {cpu}\\n")
"""


def setup(work: Path, n: int) -> list[tuple]:
    """n random 256+ px JPEGs and the SD-config VAE (random torch weights, converted) under `work`."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from dit import vae as vae_lib
    from pipelines.sources import file_units  # noqa: F401  (import check)

    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        rel = f"c{i % 4}/{i:04d}.jpg"
        (work / "images" / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (300, 340, 3), np.uint8)).save(work / "images" / rel, quality=90)
        items.append((i, str(work / "images" / rel), i % 4, rel))
    torch.manual_seed(0)
    model = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                          down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4).eval()
    torch.save(model.state_dict(), work / "torch_vae.pt")
    config = vae_lib.VAEConfig.from_diffusers(dict(model.config))
    params = vae_lib.convert_diffusers_state_dict({k: v.numpy() for k, v in model.state_dict().items()},
                                                  config)
    vae_lib.save(work / "vae", config, params)
    return items


def torch_loop(work: Path, items: list[tuple], batch: int, size: int) -> float:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from pipelines.images import read_image

    model = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                          down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4).eval()
    model.load_state_dict(torch.load(work / "torch_vae.pt", weights_only=True))
    with torch.no_grad():
        model.encode(torch.zeros(batch, 3, size, size))  # warm-up: oneDNN picks its kernels
        t = time.perf_counter()
        for s in range(0, len(items), batch):
            x = np.stack([read_image(p, size) for _, p, _, _ in items[s:s + batch]]).astype(np.float32)
            x = torch.from_numpy(x.transpose(0, 3, 1, 2) / 127.5 - 1.0)
            x = torch.cat([x, torch.flip(x, dims=[3])])  # the job encodes every image and its mirror
            dist = model.encode(x).latent_dist
            _ = dist.mean.numpy(), dist.logvar.numpy()
        return len(items) / (time.perf_counter() - t)


def beam_run(work: Path, items: list[tuple], batch: int, size: int, workers: int, tag: str) -> float:
    from pipelines.encode import run
    from pipelines.sources import file_units

    out = work / f"out-{tag}"
    out.mkdir()
    t = time.perf_counter()
    # the scaling runs use worker processes even for 1 worker, so only the worker count differs
    extra = ["--direct_running_mode=multi_processing"] if tag.startswith(("w", "stage")) else []
    shards, skipped = run(file_units(items, batch), str(work / "vae"), str(out), size, batch, 4, True,
                          "float32", "DirectRunner", workers, extra)
    assert not skipped and sum(s["records"] for s in shards) == 2 * len(items)
    return len(items) / (time.perf_counter() - t)


def child(argv: list[str]) -> None:
    """One Beam run in a fresh process (so env and the compile cache are set before jax is imported)."""
    work, batch, size, workers, tag = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    items = json.loads((work / "items.json").read_text())
    print(json.dumps({"img_s": beam_run(work, [tuple(i) for i in items], batch, size, workers, tag)}))


def in_child(work: Path, batch: int, size: int, workers: int, tag: str, env: dict, hook: Path | None = None
             ) -> float:
    path = os.pathsep.join(str(p) for p in (hook, ROOT) if p)  # the hook first: its sitecustomize wins
    proc = subprocess.run([sys.executable, __file__, "--child", str(work), str(batch), str(size),
                           str(workers), tag], env={**os.environ, **env, "PYTHONPATH": path},
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["img_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    print(f"cpu: {cpu_model()} x {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        work = Path(tmp)
        items = setup(work, args.images)
        (work / "items.json").write_text(json.dumps(items))
        cache = {"JAX_COMPILATION_CACHE_DIR": str(work / "jax-cache"),
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                 "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
        b, s = args.batch, args.size
        print(f"encode {args.images} images at {s} px, batch {b} (+ flips), SD VAE config:", flush=True)
        torch_ips = torch_loop(work, items, b, s)
        print(f"  torch loop (diffusers)       {torch_ips:7.2f} img/s", flush=True)
        cold = in_child(work, b, s, 1, "cold", cache)
        print(f"  Beam DirectRunner, cold      {cold:7.2f} img/s   ratio {cold / torch_ips:.2f}", flush=True)
        warm = in_child(work, b, s, 1, "warm", cache)
        print(f"  Beam DirectRunner, warm      {warm:7.2f} img/s   ratio {warm / torch_ips:.2f}", flush=True)
        stage = in_child(work, b, s, 2, "stage", cache)
        print(f"  Beam DirectRunner, 2 workers {stage:7.2f} img/s   ratio {stage / torch_ips:.2f}"
              "   (as the encode stage runs it)", flush=True)
        (work / "hook").mkdir()
        (work / "hook" / "sitecustomize.py").write_text(PIN_HOOK)
        pin_log = work / "pinned.txt"
        pinned = {**cache, **ONE_THREAD, "BENCH_PIN_WORKERS": str(pin_log)}
        in_child(work, b, s, 1, "warmup-1t", pinned, work / "hook")  # the cache for a 1-CPU worker
        one = in_child(work, b, s, 1, "w1", pinned, work / "hook")
        print(f"scaling, one CPU per worker: 1 worker {one:.2f} img/s", flush=True)
        pin_log.write_text("")
        two = in_child(work, b, s, 2, "w2", pinned, work / "hook")
        print(f"  pinned workers of the 2-worker run (WORKER_ID cpu): {sorted(pin_log.read_text().splitlines())}")
        print(f"scaling, one CPU per worker: 1 worker {one:.2f} img/s, 2 workers {two:.2f} img/s, "
              f"ratio {two / one:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
