"""The latent record: what the encode job writes and the trainer's loader reads.

One ArrayRecord record per (image, view); each record is a msgpack map (flax.serialization, no pickle):

| field   | type                          | meaning                                                        |
| ------- | ----------------------------- | -------------------------------------------------------------- |
| version | int                           | SCHEMA_VERSION; a reader refuses a version it does not know     |
| mean    | float16 or float32, (h, w, c) | the VAE posterior mean, unscaled (multiply by scaling_factor)   |
| logvar  | same dtype and shape          | the posterior log-variance, clipped to [-30, 20] as diffusers   |
| label   | int                           | class index (sorted class folders, or the tfds label feature)   |
| index   | int                           | the example's position in the data index (tfds: in the split)   |
| flip    | int                           | 0: the image, 1: its horizontal mirror                          |
| key     | str                           | the example's source key: file path under the root, or tfds id  |

The trainer samples z = mean + exp(logvar / 2) * eps afresh at every step, as the official DiT does.
float16 halves the shards (ImageNet with flips: ~80 GB in float32); its rounding (~5e-4 relative) is far
below the posterior's own noise. Version 1 (records without `version`, float32, no `key`) is still read.
Shards are `latents-SSSSS-of-NNNNN.array_record`; a record's shard is its index mod N, sorted by
(index, flip) inside.
"""

from __future__ import annotations

import numpy as np

SCHEMA_VERSION = 2
KNOWN_VERSIONS = (1, 2)
DTYPES = ("float16", "float32")
ARRAY_RECORD_OPTIONS = "group_size:1"  # one record per chunk: cheap random access for Grain


def shard_name(shard: int, num_shards: int) -> str:
    return f"latents-{shard:05d}-of-{num_shards:05d}.array_record"


def encode_record(mean: np.ndarray, logvar: np.ndarray, label: int, index: int, flip: int, key: str,
                  dtype: str = "float32") -> bytes:
    from flax import serialization

    if dtype not in DTYPES:
        raise ValueError(f"record dtype {dtype!r}: expected one of {DTYPES}")
    return serialization.msgpack_serialize({
        "version": SCHEMA_VERSION,
        "mean": np.asarray(mean, dtype), "logvar": np.asarray(logvar, dtype),
        "label": int(label), "index": int(index), "flip": int(flip), "key": str(key)})


class UnknownSchema(ValueError):
    """A record written by another (newer or foreign) schema version."""


def decode_record(data: bytes) -> dict:
    """The record's fields (arrays keep their stored dtype); ValueError for a schema this code predates."""
    from flax import serialization

    record = serialization.msgpack_restore(data)
    version = record.get("version", 1) if isinstance(record, dict) else None
    if version not in KNOWN_VERSIONS:
        raise UnknownSchema(f"latent record schema version {version!r} is not one this code reads "
                         f"{KNOWN_VERSIONS}; re-run the encode stage or update the code")
    return record
