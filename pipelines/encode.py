"""The encode job: images -> VAE posterior moments (and those of the horizontal flip) -> ArrayRecord shards.

A plain Apache Beam pipeline, so the same code runs on DirectRunner here and on Dataflow / Flink / Spark at
ImageNet scale. Two choices keep its output byte-identical whatever the runner or worker count:
- images are grouped into fixed batches by index (batch = index // batch_size) and every VAE call sees the
  same padded shape, so an image's encoding never depends on how the runner bundled the work;
- a record's shard is fixed by its image index, and each shard is written sorted by (index, flip). Beam's
  file sinks (array_record's `WriteToArrayRecord` included) put records in bundle order, which varies from
  run to run, so shards are written here with the same ArrayRecordWriter options that sink uses.

Each record is a msgpack map (no pickle): mean, logvar (float32 HWC latents, unscaled), label, index, flip.
Training samples z = mean + exp(logvar / 2) * eps afresh at every step, as the official DiT does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

ARRAY_RECORD_OPTIONS = "group_size:1"  # one record per chunk: cheap random access for Grain


def shard_name(shard: int, num_shards: int) -> str:
    return f"latents-{shard:05d}-of-{num_shards:05d}.array_record"


def encode_record(mean: np.ndarray, logvar: np.ndarray, label: int, index: int, flip: int) -> bytes:
    from flax import serialization

    return serialization.msgpack_serialize({
        "mean": np.asarray(mean, np.float32), "logvar": np.asarray(logvar, np.float32),
        "label": int(label), "index": int(index), "flip": int(flip)})


def decode_record(data: bytes) -> dict:
    from flax import serialization

    return serialization.msgpack_restore(data)


class EncodeBatch(beam.DoFn):
    """(batch id, [(index, path, label)]) -> (shard, (index, flip, record bytes)); bad images -> 'skipped'."""

    def __init__(self, vae_dir: str, image_size: int, batch_size: int, flip: bool, num_shards: int):
        self.vae_dir, self.image_size, self.batch_size = vae_dir, image_size, batch_size
        self.flip, self.num_shards = flip, num_shards

    def setup(self):
        import jax

        from dit import vae as vae_lib

        config, params = vae_lib.load(self.vae_dir)
        model = vae_lib.AutoencoderKL(config)
        self._encode = jax.jit(lambda x: model.apply({"params": params}, x, method=model.encode))

    def process(self, element):
        from stages.images import BadImage, load_image

        _, items = element
        images, kept = [], []
        for index, path, label in sorted(items):
            try:
                images.append(load_image(path, self.image_size))
                kept.append((index, label))
            except BadImage as e:
                yield beam.pvalue.TaggedOutput("skipped", {"item": path, "reason": str(e)})
        if not kept:
            return
        x = np.zeros((self.batch_size, self.image_size, self.image_size, 3), np.float32)
        x[:len(kept)] = np.stack(images).astype(np.float32) / 127.5 - 1.0
        views = [x, x[:, :, ::-1]] if self.flip else [x]
        mean, logvar = (np.asarray(a) for a in self._encode(np.concatenate(views)))
        for v in range(len(views)):
            for j, (index, label) in enumerate(kept):
                k = v * self.batch_size + j
                yield (index % self.num_shards,
                       (index, v, encode_record(mean[k], logvar[k], label, index, v)))


class WriteShard(beam.DoFn):
    """(shard, records) -> one ArrayRecord file sorted by (index, flip); yields its stats as JSON."""

    def __init__(self, out_dir: str, num_shards: int):
        self.out_dir, self.num_shards = out_dir, num_shards

    def process(self, element):
        from array_record.python.array_record_module import ArrayRecordWriter

        shard, records = element
        records = sorted(records, key=lambda r: (r[0], r[1]))
        path = Path(self.out_dir) / shard_name(shard, self.num_shards)
        tmp = path.with_name("." + path.name + ".tmp")
        writer = ArrayRecordWriter(str(tmp), ARRAY_RECORD_OPTIONS)
        for _, _, data in records:
            writer.write(data)
        writer.close()
        tmp.rename(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        yield json.dumps({"file": path.name, "records": len(records), "sha256": digest})


def run(items: list[tuple[int, str, int]], vae_dir: str, out_dir: str, image_size: int,
        batch_size: int, num_shards: int, flip: bool, runner: str = "DirectRunner",
        num_workers: int = 1, extra_options: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Run the pipeline; return (shard stats, skipped items). Side files are removed afterwards."""
    out = Path(out_dir)
    argv = [f"--runner={runner}", *(extra_options or [])]
    if runner == "DirectRunner":
        mode = "multi_processing" if num_workers > 1 else "in_memory"
        argv += [f"--direct_running_mode={mode}", f"--direct_num_workers={max(1, num_workers)}",
                 "--default_sdk_harness_log_level=ERROR"]
    with beam.Pipeline(options=PipelineOptions(argv)) as p:
        encoded = (
            p
            | "Items" >> beam.Create(items)
            | "ByBatch" >> beam.Map(lambda it: (it[0] // batch_size, it))
            | "GroupBatches" >> beam.GroupByKey()
            | "Encode" >> beam.ParDo(
                EncodeBatch(vae_dir, image_size, batch_size, flip, num_shards)).with_outputs(
                    "skipped", main="records"))
        (encoded.records
         | "GroupShards" >> beam.GroupByKey()
         | "WriteShards" >> beam.ParDo(WriteShard(str(out), num_shards))
         | "ShardStats" >> beam.io.WriteToText(str(out / "_shards"), ".jsonl", num_shards=1,
                                                shard_name_template=""))
        (encoded.skipped
         | "SkippedJson" >> beam.Map(json.dumps)
         | "Skipped" >> beam.io.WriteToText(str(out / "_skipped"), ".jsonl", num_shards=1,
                                            shard_name_template=""))

    def read_side(name: str) -> list[dict]:
        path = out / name
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        path.unlink()
        return rows

    shards = sorted(read_side("_shards.jsonl"), key=lambda s: s["file"])
    skipped = sorted(read_side("_skipped.jsonl"), key=lambda s: s["item"])
    return shards, skipped
