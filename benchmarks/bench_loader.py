"""The Grain loader alone against the trainer it feeds: img/s of each, and their ratio (goal >= 20x).

Two shapes: the embedded default (8x8x4 latents, the params.yaml model, batch 64) and DiT-S/2-shaped
records (32x32x4 latents, DiT-S/2, batch 8 on a CPU). Records are written in the encode stage's format
(msgpack, ArrayRecord, one record per chunk) to a temporary folder; the loader is stages/runtime/loader.py with
its defaults (no worker processes), the trainer step is stages/train.py's `make_step` on this machine's
devices, timed after compilation.

    .venv/bin/python benchmarks/bench_loader.py [--records 4096] [--seconds 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402


def write_shards(folder: Path, n: int, shape: tuple[int, ...], shards: int = 4) -> tuple[list[Path], list[int]]:
    from array_record.python.array_record_module import ArrayRecordWriter

    from pipelines.records import ARRAY_RECORD_OPTIONS, encode_record, shard_name

    rng = np.random.default_rng(0)
    paths, counts = [], []
    for k in range(shards):
        path = folder / shard_name(k, shards)
        w = ArrayRecordWriter(str(path), ARRAY_RECORD_OPTIONS)
        idx = range(k, n, shards)
        for i in idx:
            w.write(encode_record(rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32),
                                  i % 10, i, 0, f"bench/{i:08d}"))
        w.close()
        paths.append(path)
        counts.append(len(idx))
    return paths, counts


def loader_img_s(paths, counts, batch: int, seconds: float) -> float:
    from stages.runtime.loader import make_loader, open_records

    records = open_records(paths, counts, use_flips=True, flip_encoded=False)
    it = make_loader(records, batch, seed=0, rows=(0, batch), start_step=0, only_unflipped=False)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    return n * batch / (time.perf_counter() - t0)


def trainer_img_s(cfg: dict, latent: int, batch: int, seconds: float) -> float:
    import jax

    from dit.backend import keep_step_memory, step_compiler_options
    from dit.diffusion import create_diffusion
    from dit.models import DiT, dit_config, init_params
    from stages.runtime.train_step import make_optimizer, make_step

    keep_step_memory()  # as the train stage sets it, with step_compiler_options below
    common = dict(input_size=latent, in_channels=4, num_classes=10, learn_sigma=True, block="adaln_zero")
    config = (dit_config(cfg["model"], **common) if cfg.get("model") else
              dit_config(None, depth=cfg["depth"], hidden_size=cfg["hidden_size"], num_heads=cfg["num_heads"],
                         patch_size=cfg["patch_size"], **common))
    tx = make_optimizer({"lr": 1e-4, "weight_decay": 0.0, "grad_clip": None})
    key = jax.random.key(0)
    p = init_params(config, key)
    state = {"params": p, "ema": jax.tree.map(lambda x: x.copy(), p), "opt_state": tx.init(p)}
    step = jax.jit(make_step(DiT(config), create_diffusion("", learn_sigma=True), tx, 0.18215, 0.9999, key),
                   donate_argnums=0, compiler_options=step_compiler_options())
    rng = np.random.default_rng(0)
    b = {"mean": rng.standard_normal((batch, latent, latent, 4), np.float32),
         "logvar": np.full((batch, latent, latent, 4), -4.0, np.float32),
         "label": (np.arange(batch) % 10).astype(np.int32)}
    state, m = step(state, b, 0)
    jax.block_until_ready(m)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        state, m = step(state, b, n + 1)
        n += 1
    jax.block_until_ready(m)
    return n * batch / (time.perf_counter() - t0)


def main(argv=None) -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=4096)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args(argv)
    default = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())["train"]
    cases = [("embedded default (8x8x4, params.yaml model)", 8, default, default["global_batch_size"]),
             ("DiT-S/2-shaped (32x32x4, DiT-S/2)", 32, {"model": "DiT-S/2"}, 8)]
    print(f"CPU: {cpu_model()}")
    ok = True
    for name, latent, cfg, batch in cases:
        with tempfile.TemporaryDirectory() as tmp:
            paths, counts = write_shards(Path(tmp), args.records, (latent, latent, 4))
            load = loader_img_s(paths, counts, batch, args.seconds)
        train = trainer_img_s(cfg, latent, batch, args.seconds)
        ratio = load / train
        ok &= ratio >= 20
        print(f"{name}: batch {batch}: loader {load:,.0f} img/s, trainer {train:,.1f} img/s, "
              f"ratio {ratio:,.1f}x ({'>=' if ratio >= 20 else '<'} 20x)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
