"""reference stage: an ADM-format reference batch from the real images.

The statistics (mu, sigma from pool_3; mu_s, sigma_s from the spatial features) use every image the data
stage accepted, centre-cropped to `data.image_size` exactly as the encode stage sees them; `arr_0` keeps up
to `reference.max_images` of them, evenly spaced over the index. With `reference.adm_batch` set, a published
ADM reference batch (VIRTUAL_imagenet256_labeled.npz) is checked, hashed and used as it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from stages.runtime.common import (Manifest, atomic_dir, fail, load_inception, load_params, main_guard,
                           read_manifest, require_path, sha256_file)
from stages.runtime.images import BadImage, iter_images, read_index

DATA, OUT = Path("artifacts/data"), Path("artifacts/reference")


def use_adm_batch(path: Path, size: int, params: dict) -> None:
    """Take a published ADM reference batch as it is (checked, copied, hashed): the paper's FIDs use
    VIRTUAL_imagenet256_labeled.npz, not statistics of one's own copy of ImageNet."""
    from metrics.adm import check_adm_batch

    require_path(path, "reference.adm_batch")
    try:
        info = check_adm_batch(path, size)
    except ValueError as e:
        fail(str(e))
    manifest = Manifest("reference", params)
    manifest.add_input("adm_batch", path)
    with atomic_dir(OUT) as tmp:
        shutil.copyfile(path, tmp / "reference.npz")
        manifest.counts = {"total": info["images"], "processed": info["images"], "skipped": 0,
                           "kept_in_arr_0": info["images"]}
        manifest.extra.update({"adm_batch": str(path), "statistics": info["statistics"],
                               "reference_sha256": sha256_file(tmp / "reference.npz")})
        manifest.write(tmp)
    print(f"reference: ADM batch {path} ({info['images']} images) -> {OUT}")


def main(argv: list[str]) -> None:
    params = load_params("reference", argv, __doc__)
    size, cfg, ev = params["data"]["image_size"], params["reference"], params["evaluate"]
    if not isinstance(cfg["max_images"], int) or cfg["max_images"] < 1:
        fail(f"reference.max_images: expected a positive integer, got {cfg['max_images']!r}")
    if cfg["adm_batch"]:
        return use_adm_batch(Path(cfg["adm_batch"]), size, params)
    require_path(DATA / "index.json", "artifacts/data")
    read_manifest(DATA)

    from metrics.adm import write_reference

    manifest = Manifest("reference", params)
    inception = load_inception(ev, manifest)
    manifest.add_input("data", DATA / "index.json")
    images, labels, positions = [], [], []
    index = read_index(DATA)
    total = 0
    for position, (key, label, image) in enumerate(iter_images(index, size)):  # files or a tfds split alike
        total += 1
        if isinstance(image, BadImage):
            manifest.skip(key, str(image))
        else:
            images.append(image)
            labels.append(label)
            positions.append(position)
    if not images:
        fail("artifacts/data: no readable images for the reference batch")
    images = np.stack(images)
    features = inception.features(images, batch_size=ev["batch_size"])
    keep = np.unique(np.linspace(0, len(images) - 1, min(cfg["max_images"], len(images))).round()
                     .astype(int))
    with atomic_dir(OUT) as tmp:
        write_reference(tmp / "reference.npz", images[keep], features, feature_id=inception.feature_id,
                        images_features={k: features[k][keep] for k in ("pool_3", "spatial")},
                        images_index=np.asarray(positions)[keep])
        manifest.counts = {"total": total, "processed": len(images),
                           "skipped": len(manifest.skipped), "kept_in_arr_0": int(len(keep))}
        manifest.extra.update({"inception": {"source": inception.source,
                                             "weights_sha256": inception.weights_sha256},
                               "reference_sha256": sha256_file(tmp / "reference.npz")})
        manifest.write(tmp)
    print(f"reference: statistics of {len(images)} images, {len(keep)} kept -> {OUT}")


if __name__ == "__main__":
    main_guard(main)
