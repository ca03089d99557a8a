"""encode stage: run the Beam encode job (pipelines/encode.py) over the data index with the VAE."""

from __future__ import annotations

import json
from pathlib import Path

from stages.common import (Manifest, atomic_dir, fail, load_params, main_guard, read_manifest,
                           require_path)
from stages.images import iter_items, read_index

DATA, VAE, OUT = Path("artifacts/data"), Path("artifacts/vae"), Path("artifacts/latents")


def main(argv: list[str]) -> None:
    params = load_params("encode", argv, __doc__)
    cfg, image_size = params["encode"], params["data"]["image_size"]
    require_path(DATA / "index.json", "artifacts/data")
    require_path(VAE / "config.json", "artifacts/vae")
    read_manifest(DATA)
    for key in ("shards", "batch_size", "num_workers"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            fail(f"encode.{key}: expected a positive integer, got {cfg[key]!r}")
    index = read_index(DATA)
    items = [(i, str(path), label) for i, path, label in iter_items(index)]
    if cfg["shards"] > len(items):
        fail(f"encode.shards: {cfg['shards']} shards for {len(items)} images; use at most one per image")

    import logging

    logging.getLogger().setLevel(logging.ERROR)  # Beam's workers log every bundle at INFO/WARNING
    from pipelines.encode import run  # after the checks: importing Beam takes seconds

    manifest = Manifest("encode", params)
    manifest.add_input("data", DATA / "index.json")
    manifest.add_input("vae", VAE, exclude=("manifest.json",))
    vae_config = json.loads((VAE / "config.json").read_text())
    with atomic_dir(OUT) as tmp:
        shards, skipped = run(items, str(VAE), str(tmp), image_size, cfg["batch_size"], cfg["shards"],
                              cfg["flip"], cfg["runner"], cfg["num_workers"], cfg["pipeline_options"])
        for s in skipped:
            manifest.skip(s["item"], s["reason"])
        views = 2 if cfg["flip"] else 1
        records = sum(s["records"] for s in shards)
        processed = records // views
        manifest.counts = {"total": len(items), "processed": processed, "skipped": len(skipped),
                           "records": records}
        if processed + len(skipped) != len(items):
            fail(f"encode: {processed} encoded + {len(skipped)} skipped != {len(items)} images")
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        from pipelines.encode import decode_record

        first = decode_record(ArrayRecordDataSource([str(tmp / shards[0]["file"])])[0])
        manifest.extra.update({
            "shards": shards,
            "num_classes": len(index["classes"]),
            "classes": index["classes"],
            "latent_shape": list(first["mean"].shape),
            "scaling_factor": vae_config["scaling_factor"],
            "flip": cfg["flip"],
        })
        manifest.write(tmp)
    print(f"encode: {records} records in {len(shards)} shards, {len(skipped)} skipped -> {OUT}")


if __name__ == "__main__":
    main_guard(main)
