"""The encode job: images -> VAE posterior moments (and those of the horizontal flip) -> ArrayRecord shards.

A plain Apache Beam pipeline, so the same code runs on DirectRunner here and on Dataflow / Flink / Spark
(through the portable Fn API) at ImageNet scale. Every path goes through Beam's FileSystems
(pipelines/storage.py): images, VAE weights, shards and side files may be local, gs:// or s3://.

Two choices keep its output byte-identical whatever the runner or worker count:
- images are grouped into fixed batches by index (batch = index // batch_size) and every VAE call sees the
  same padded shape, so an image's encoding never depends on how the runner bundled the work (XLA picks
  kernels by shape);
- a record's shard is fixed by its image index, and each shard is written sorted by (index, flip). Beam's
  file sinks (array_record's `WriteToArrayRecord` included) put records in bundle order, which varies from
  run to run, so shards are written here with the same ArrayRecordWriter options that sink uses.

The record schema is in pipelines/records.py (re-exported here for the loader).
"""

from __future__ import annotations

import json
import os
import tempfile

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import storage
from pipelines.records import (ARRAY_RECORD_OPTIONS, SCHEMA_VERSION, decode_record,  # noqa: F401
                               encode_record, shard_name)


def load_vae(folder: str):
    """(config, params) of the vae stage's output folder on any FileSystem; ValueError if they disagree."""
    from flax import serialization

    from dit import vae as vae_lib

    paths = {name: storage.join(folder, name) for name in (vae_lib.CONFIG, vae_lib.WEIGHTS)}
    for path in paths.values():
        if not storage.exists(path):
            raise ValueError(f"{path}: missing (expected the output of the vae stage)")
    config = vae_lib.VAEConfig.from_dict(json.loads(storage.read_bytes(paths[vae_lib.CONFIG])))
    params = serialization.msgpack_restore(storage.read_bytes(paths[vae_lib.WEIGHTS]))
    vae_lib.check_params(params, config)
    return config, params


class EncodeUnit(beam.DoFn):
    """A work unit (pipelines/sources.py) -> (shard, (index, flip, record bytes)); bad images -> 'skipped'."""

    def __init__(self, vae_dir: str, image_size: int, batch_size: int, flip: bool, num_shards: int,
                 dtype: str):
        self.vae_dir, self.image_size, self.batch_size = vae_dir, image_size, batch_size
        self.flip, self.num_shards, self.dtype = flip, num_shards, dtype

    def setup(self):
        import jax

        from dit import backend, vae as vae_lib

        config, params = load_vae(self.vae_dir)
        model = vae_lib.AutoencoderKL(config)
        self._encode = jax.jit(lambda x: model.apply({"params": params}, x, method=model.encode),
                               compiler_options=backend.conv_compiler_options())

    def process(self, unit):
        from pipelines.images import BadImage, decode_image
        from pipelines.sources import read_unit

        batch, batch_id = [], None
        for index, key, label, data, reason in read_unit(unit):
            if reason is None:
                try:
                    image = decode_image(data, self.image_size)
                except BadImage as e:
                    reason = str(e)
            if reason is not None:
                yield beam.pvalue.TaggedOutput("skipped", {"item": key, "reason": reason})
                continue
            if batch and index // self.batch_size != batch_id:  # units arrive in index order
                yield from self.encode_batch(batch)
                batch = []
            batch_id = index // self.batch_size
            batch.append((index, key, label, image))
        if batch:
            yield from self.encode_batch(batch)

    def encode_batch(self, batch):
        # Always the full batch shape (tail padded with zeros): the same compiled kernel for every call.
        x = np.zeros((self.batch_size, self.image_size, self.image_size, 3), np.float32)
        x[:len(batch)] = np.stack([b[3] for b in batch]).astype(np.float32) / 127.5 - 1.0
        views = [x, x[:, :, ::-1]] if self.flip else [x]
        mean, logvar = (np.asarray(a) for a in self._encode(np.concatenate(views)))
        for v in range(len(views)):
            for j, (index, key, label, _) in enumerate(batch):
                k = v * self.batch_size + j
                yield (index % self.num_shards,
                       (index, v, encode_record(mean[k], logvar[k], label, index, v, key, self.dtype)))


class WriteShard(beam.DoFn):
    """(shard, records) -> one ArrayRecord file sorted by (index, flip); yields its stats as JSON.

    ArrayRecord writes only local files, so the shard is built in a local temp file and copied to its
    place through FileSystems (a plain copy when the target is local too).
    """

    def __init__(self, out_dir: str, num_shards: int):
        self.out_dir, self.num_shards = out_dir, num_shards

    def process(self, element):
        from array_record.python.array_record_module import ArrayRecordWriter

        shard, records = element
        records = sorted(records, key=lambda r: (r[0], r[1]))
        name = shard_name(shard, self.num_shards)
        with tempfile.TemporaryDirectory(prefix="encode-shard-") as tmp:
            local = os.path.join(tmp, name)
            writer = ArrayRecordWriter(local, ARRAY_RECORD_OPTIONS)
            for _, _, data in records:
                writer.write(data)
            writer.close()
            digest = storage.upload(local, storage.join(self.out_dir, name))
        yield json.dumps({"file": name, "records": len(records), "sha256": digest})


def pipeline_options(runner: str, num_workers: int, extra_options: list[str] | None) -> PipelineOptions:
    """DirectRunner means Beam's Python FnApiRunner, in memory or over `num_workers` processes. Since Beam
    2.68 the DirectRunner first tries Prism, a Go runner it downloads from GitHub at run time (offline it
    falls back, leaving an empty /tmp/beam-temp* folder); Beam's advice to keep the Python runner is to
    name FnApiRunner."""
    argv = [f"--runner={'FnApiRunner' if runner == 'DirectRunner' else runner}", *(extra_options or [])]
    if runner == "DirectRunner":
        mode = "multi_processing" if num_workers > 1 else "in_memory"
        if any(a.startswith("--direct_running_mode") for a in argv):
            mode = next(a for a in argv if a.startswith("--direct_running_mode")).split("=", 1)[1]
        argv += [f"--direct_running_mode={mode}", f"--direct_num_workers={max(1, num_workers)}",
                 "--default_sdk_harness_log_level=ERROR"]
    return PipelineOptions(argv)


def run(units: list[tuple], vae_dir: str, out_dir: str, image_size: int, batch_size: int,
        num_shards: int, flip: bool, dtype: str = "float32", runner: str = "DirectRunner",
        num_workers: int = 1, extra_options: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Run the pipeline over work units; return (shard stats, skipped items). Side files are removed."""
    with beam.Pipeline(options=pipeline_options(runner, num_workers, extra_options)) as p:
        encoded = (
            p
            | "Units" >> beam.Create(units, reshuffle=False)
            | "Spread" >> beam.Reshuffle()  # units to workers; their order does not matter
            | "Encode" >> beam.ParDo(
                EncodeUnit(vae_dir, image_size, batch_size, flip, num_shards, dtype)).with_outputs(
                    "skipped", main="records"))
        (encoded.records
         | "GroupShards" >> beam.GroupByKey()
         | "WriteShards" >> beam.ParDo(WriteShard(out_dir, num_shards))
         | "ShardStats" >> beam.io.WriteToText(storage.join(out_dir, "_shards"), ".jsonl",
                                                num_shards=1, shard_name_template=""))
        (encoded.skipped
         | "SkippedJson" >> beam.Map(json.dumps, sort_keys=True)
         | "Skipped" >> beam.io.WriteToText(storage.join(out_dir, "_skipped"), ".jsonl", num_shards=1,
                                            shard_name_template=""))

    def read_side(name: str) -> list[dict]:
        path = storage.join(out_dir, name)
        rows = [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line.strip()]
        storage.delete(path)
        return rows

    shards = sorted(read_side("_shards.jsonl"), key=lambda s: s["file"])
    skipped = sorted(read_side("_skipped.jsonl"), key=lambda s: s["item"])
    return shards, skipped
