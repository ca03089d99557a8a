"""encode stage: run the Beam encode job (pipelines/encode.py) over the data index with the VAE.

Whole-job problems (a bad param, a runner Beam does not know, a VAE folder whose weights do not match its
config, an unreachable path) are reported on one line before the job starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.runtime.common import (Manifest, atomic_dir, fail, is_int, load_params, main_guard, read_manifest,
                           require_path)
from stages.runtime.images import read_index

DATA, VAE, OUT = Path("artifacts/data"), Path("artifacts/vae"), Path("artifacts/latents")


def check_runner(name: str) -> None:
    from apache_beam.runners.runner import create_runner

    try:
        create_runner(name)
    except ValueError:
        fail(f"encode.runner: '{name}' is not a Beam runner (DirectRunner, PortableRunner, DataflowRunner, "
             "FlinkRunner, SparkRunner, PrismRunner, or a fully qualified class name)")
    except ImportError as e:
        fail(f"encode.runner: {name} needs a Beam extra that is not installed ({e})")


def work_units(index: dict, batch_size: int) -> tuple[list[tuple], int]:
    """The job's work units and the number of examples they cover."""
    from pipelines import sources

    if index["source"] == "tfds":
        spec = index["tfds"]
        return sources.tfds_units(spec, batch_size), spec["num_examples"]
    root = str(index["root_path"])
    items = [(i, f"{root.rstrip('/')}/{rel}", int(label), rel, sha)
             for i, (rel, label, sha) in enumerate(index["items"])]
    return sources.file_units(items, batch_size), len(items)


def main(argv: list[str]) -> None:
    params = load_params("encode", argv, __doc__)
    cfg, image_size = params["encode"], params["data"]["image_size"]
    require_path(DATA / "index.json", "artifacts/data")
    require_path(VAE / "config.json", "artifacts/vae")
    read_manifest(DATA)
    for key in ("shards", "batch_size", "num_workers"):
        if not is_int(cfg[key]):
            fail(f"encode.{key}: expected a positive integer, got {cfg[key]!r}")
    if cfg["dtype"] not in ("float16", "float32"):
        fail(f"encode.dtype: expected float16 or float32, got {cfg['dtype']!r}")
    if not isinstance(cfg["pipeline_options"], list):
        fail(f"encode.pipeline_options: expected a list of flags, got {cfg['pipeline_options']!r}")
    index = read_index(DATA)

    import logging

    logging.getLogger().setLevel(logging.ERROR)  # Beam's workers log every bundle at INFO/WARNING
    # after the cheap checks: importing Beam takes seconds
    from pipelines.encode import load_vae, run
    from pipelines.records import SCHEMA_VERSION, decode_record

    check_runner(cfg["runner"])
    if index["source"] == "tfds":
        from stages.runtime.tfds_source import check_paths

        check_paths(index["tfds"].get("data_dir"), None)
    try:
        load_vae(str(VAE))
    except (ValueError, TypeError, KeyError) as e:
        fail(f"artifacts/vae: {e}")
    units, total = work_units(index, cfg["batch_size"])
    if cfg["shards"] > total:
        fail(f"encode.shards: {cfg['shards']} shards for {total} images; use at most one per image")

    manifest = Manifest("encode", params)
    manifest.add_input("data", DATA / "index.json")
    manifest.add_input("vae", VAE, exclude=("manifest.json",))
    vae_config = json.loads((VAE / "config.json").read_text())
    with atomic_dir(OUT) as tmp:
        shards, skipped = run(units, str(VAE), str(tmp), image_size, cfg["batch_size"], cfg["shards"],
                              cfg["flip"], cfg["dtype"], cfg["runner"], cfg["num_workers"],
                              cfg["pipeline_options"])
        for s in skipped:
            manifest.skip(s["item"], s["reason"])
        views = 2 if cfg["flip"] else 1
        records = sum(s["records"] for s in shards)
        processed = records // views
        manifest.counts = {"total": total, "processed": processed, "skipped": len(skipped),
                           "records": records}
        if processed + len(skipped) != total:
            fail(f"encode: {processed} encoded + {len(skipped)} skipped != {total} images")
        if not shards:
            fail(f"encode: no image could be encoded ({len(skipped)} skipped)")
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        first = decode_record(ArrayRecordDataSource([str(tmp / shards[0]["file"])])[0])
        manifest.extra.update({
            "shards": shards,
            "record_schema": {"version": SCHEMA_VERSION, "dtype": cfg["dtype"],
                              "fields": sorted(first)},
            "num_classes": len(index["classes"]),
            "classes": index["classes"],
            "empty_classes": index.get("empty_classes", []),
            "source": index["source"],
            "latent_shape": list(first["mean"].shape),
            "scaling_factor": vae_config["scaling_factor"],
            "flip": cfg["flip"],
        })
        manifest.write(tmp)
    print(f"encode: {records} records in {len(shards)} shards, {len(skipped)} skipped -> {OUT}")


if __name__ == "__main__":
    main_guard(main)
