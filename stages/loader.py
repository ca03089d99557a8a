"""Grain input pipeline over the encode stage's ArrayRecord shards.

Records are shuffled by Grain's IndexSampler from a named seed and sharded by JAX process, so each host
reads its own slice and the global batch order is fixed by (seed, process count) alone.
"""

from __future__ import annotations

from pathlib import Path

import grain
import numpy as np

from pipelines.encode import decode_record


class ParseLatents(grain.transforms.Map):
    def map(self, data: bytes) -> dict:
        r = decode_record(data)
        return {"mean": np.asarray(r["mean"], np.float32), "logvar": np.asarray(r["logvar"], np.float32),
                "label": np.int32(r["label"]), "flip": np.int32(r["flip"])}


class DropFlips(grain.transforms.Filter):
    def filter(self, element: dict) -> bool:
        return int(element["flip"]) == 0


def make_loader(shards: list[Path], batch_size: int, seed: int, use_flips: bool,
                num_workers: int = 0, process_index: int = 0, process_count: int = 1):
    """An endless Grain DataLoader of per-process batches {mean, logvar, label, flip}."""
    source = grain.sources.ArrayRecordDataSource([str(p) for p in shards])
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True),
        shuffle=True, num_epochs=None, seed=seed)
    ops = [ParseLatents()]
    if not use_flips:
        ops.append(DropFlips())
    ops.append(grain.transforms.Batch(batch_size, drop_remainder=True))
    return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                            worker_count=num_workers)
