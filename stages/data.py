"""data stage: an index of labelled RGB images (and, for the embedded default, the images themselves).

Sources:
- `digits`: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes), drawn as dark ink on
  white, upscaled to `data.image_size` and written as an ImageFolder under artifacts/data/images.
- `imagefolder`: an external tree `<data.path>/<class>/<image>` (ImageNet train as synset folders); the
  label is the sorted class-folder index. Images are not copied: the index records each file's sha256.
  An empty class folder keeps its label index (ImageNet's 1000 labels stay aligned) and is named in the
  manifest; a file that is not an image, or not in a class folder, is listed as skipped.
- `tfds`: a tensorflow-datasets image classification dataset (`imagenet2012` by default) from a prepared
  `data.data_dir` (local or gs://), or prepared first from the official tars in `data.manual_dir`. Class
  names come from the dataset's label feature; each example's key is its tfds id; `data.limit` keeps the
  first N examples of the split (tfds shuffles examples when it prepares a dataset).

Every image is decoded once here; undecodable or too-small ones are skipped and listed in the manifest, and
processed + skipped = total for every source.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.images import IMAGE_EXTENSIONS, BadImage, decode_rgb
from stages.runtime.common import (Manifest, atomic_dir, fail, is_int, load_params, main_guard, sha256_file,
                           write_json)
from stages.runtime.images import open_rgb
from stages.runtime.tfds_source import index_tfds

OUT = Path("artifacts/data")


def evenly_spaced(n: int, limit: int | None) -> list[int]:
    """Indices of `limit` items spread over all n (so a smoke-test subset keeps every class)."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, limit).round().astype(int).tolist()))


def write_digits(images_dir: Path, image_size: int, manifest: Manifest,
                 limit: int | None) -> list[tuple[str, int]]:
    import hashlib

    from sklearn.datasets import load_digits

    digits = load_digits()
    manifest.inputs["sklearn_digits"] = hashlib.sha256(
        np.ascontiguousarray(digits.images, np.float64).tobytes()
        + np.ascontiguousarray(digits.target, np.int64).tobytes()).hexdigest()
    items = []
    for i in evenly_spaced(len(digits.images), limit):
        img, label = digits.images[i], digits.target[i]
        ink = np.clip(np.round(255.0 - img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        pil = Image.fromarray(ink, mode="L").resize((image_size, image_size), Image.BICUBIC)
        rel = f"{int(label)}/{i:05d}.png"
        (images_dir / str(int(label))).mkdir(parents=True, exist_ok=True)
        pil.convert("RGB").save(images_dir / rel)
        items.append((rel, int(label)))
    return items


def list_imagefolder(root: Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, str]]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        fail(f"data.path: '{root}' has no class folders (expected <root>/<class>/<image>)")
    items, others = [], []
    for p in sorted(root.iterdir()):
        if p.is_file():
            others.append((p.name, "not in a class folder"))
    for label, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if p.is_file():
                rel = p.relative_to(root).as_posix()
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    items.append((rel, label))
                else:
                    others.append((rel, f"not an image file ({p.suffix or 'no extension'})"))
    return classes, items, others


def decode_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes started fresh ("spawn"), not forked: the tfds path has TensorFlow's threads
    running, and a caller may have JAX's (a fork of a multithreaded process can deadlock)."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def inspect(args: tuple[str, str, int]) -> tuple[str, str | None, str | None]:
    """(sha256, mode, None) for a usable image, or ("", None, reason)."""
    path, _, min_size = args
    try:
        _, mode = open_rgb(path, min_size)
    except BadImage as e:
        return "", None, str(e)
    return sha256_file(Path(path)), mode, None


def main(argv: list[str]) -> None:
    params = load_params("data", argv, __doc__)
    cfg = params["data"]
    source, size, min_size = cfg["source"], cfg["image_size"], cfg["min_size"]
    if source not in ("digits", "imagefolder", "tfds"):
        fail(f"data.source: unknown source '{source}' (expected digits, imagefolder or tfds)")
    if not isinstance(size, int) or size < 8:
        fail(f"data.image_size: expected an integer >= 8, got {size!r}")
    if not is_int(min_size):
        fail(f"data.min_size: expected a positive integer (pixels), got {min_size!r}")
    if cfg["limit"] is not None and (not isinstance(cfg["limit"], int) or cfg["limit"] < 1):
        fail(f"data.limit: expected a positive integer or null, got {cfg['limit']!r}")
    manifest = Manifest("data", params)
    if source == "tfds":
        return write_tfds_index(cfg, manifest)

    with atomic_dir(OUT) as tmp:
        if source == "digits":
            classes = [str(c) for c in range(10)]
            items, others = write_digits(tmp / "images", size, manifest, cfg["limit"]), []
            root, root_str = tmp / "images", "images"
        else:
            if not cfg["path"]:
                fail("data.path: required when data.source is imagefolder")
            root = Path(cfg["path"]).expanduser().resolve()
            if not root.is_dir():
                fail(f"data.path: '{root}' is not a folder")
            classes, items, others = list_imagefolder(root)
            items = [items[i] for i in evenly_spaced(len(items), cfg["limit"])]
            root_str = str(root)

        jobs = [(str(root / rel), rel, min_size) for rel, _ in items]
        workers = max(1, min(os.cpu_count() or 1, 8))
        with decode_pool(workers) as pool:
            results = list(pool.map(inspect, jobs, chunksize=256))
        kept, modes = [], {}
        for (rel, label), (digest, mode, reason) in zip(items, results):
            if reason:
                manifest.skip(rel, reason)
            else:
                kept.append([rel, label, digest])
                modes[mode] = modes.get(mode, 0) + 1
        for rel, reason in others:
            manifest.skip(rel, reason)
        if not kept:
            fail(f"data: no usable images under {root}")

        labels = {label for _, label, _ in kept}
        empty = [c for i, c in enumerate(classes) if i not in labels]
        write_json(tmp / "index.json", {"source": "imagefolder", "root": root_str, "classes": classes,
                                        "items": kept, "empty_classes": empty})
        manifest.counts = {"total": len(items) + len(others), "processed": len(kept),
                           "skipped": len(manifest.skipped), "classes": len(classes)}
        manifest.extra["modes_converted_to_rgb"] = {m: n for m, n in modes.items() if m != "RGB"}
        manifest.extra["empty_classes"] = empty  # no usable image; the label index is kept all the same
        if source == "imagefolder":
            manifest.inputs["images_index"] = "per-file sha256 in index.json"
        manifest.write(tmp)
    print(f"data: {len(kept)} images, {len(classes)} classes, {len(manifest.skipped)} skipped -> {OUT}")


def inspect_bytes(args: tuple[bytes, int]) -> tuple[str, str | None, str | None]:
    import hashlib

    data, min_size = args
    try:
        _, mode = decode_rgb(data, min_size)
    except BadImage as e:
        return "", None, str(e)
    return hashlib.sha256(data).hexdigest(), mode, None


def write_tfds_index(cfg: dict, manifest: Manifest) -> None:
    """Index a tfds split: every example decoded once, bad ones listed by tfds id."""
    spec, classes, examples = index_tfds(cfg)
    kept, modes, total = [], {}, 0
    workers = max(1, min(os.cpu_count() or 1, 8))
    with atomic_dir(OUT) as tmp, decode_pool(workers) as pool:
        while block := list(itertools.islice(examples, 4096)):  # bounded: ImageNet is 140 GB of JPEGs
            results = pool.map(inspect_bytes, [(data, cfg["min_size"]) for *_, data in block],
                               chunksize=64)
            for (_, key, label, _), (digest, mode, reason) in zip(block, results):
                total += 1
                if reason:
                    manifest.skip(key, reason)
                else:
                    kept.append([key, label, digest])
                    modes[mode] = modes.get(mode, 0) + 1
        if not kept:
            fail(f"data: no usable images in {spec['name']} {spec['split']}")
        spec["num_examples"] = total
        labels = {label for _, label, _ in kept}
        empty = [c for i, c in enumerate(classes) if i not in labels]
        write_json(tmp / "index.json", {"source": "tfds", "tfds": spec, "classes": classes,
                                        "items": kept, "empty_classes": empty})
        manifest.counts = {"total": total, "processed": len(kept), "skipped": len(manifest.skipped),
                           "classes": len(classes)}
        manifest.extra.update({"modes_converted_to_rgb": {m: n for m, n in modes.items() if m != "RGB"},
                               "empty_classes": empty, "tfds": spec})
        manifest.inputs["images_index"] = "per-example sha256 of the encoded image in index.json"
        manifest.write(tmp)
    print(f"data: {len(kept)} images of {spec['name']}/{spec['split']}, {len(classes)} classes, "
          f"{len(manifest.skipped)} skipped -> {OUT}")


if __name__ == "__main__":
    main_guard(main)
