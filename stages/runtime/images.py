"""The data stage's index, and the images it names, for the stages (vae, encode, reference).

Image decoding lives in pipelines/images.py, where the Beam job, the loader and the stages all reach it;
it is re-exported here so stage code keeps one import.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.images import (IMAGE_EXTENSIONS, BadImage, center_crop_arr, changed_since_indexed,  # noqa: F401
                              decode_image, decode_rgb)


def open_rgb(path: Path | str, min_size: int = 1):
    """(RGB image, original mode) of a local file, or BadImage."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImage(f"cannot read: {type(e).__name__}: {e}") from None
    return decode_rgb(data, min_size)


def load_image(path: Path | str, image_size: int, min_size: int = 1):
    """uint8 HWC RGB array of `image_size` square, or BadImage."""
    rgb, _ = open_rgb(path, min_size)
    return center_crop_arr(rgb, image_size)


def read_index(data_dir: Path | str) -> dict:
    """The data stage's `index.json`: {source, root, classes, items: [[key, label, sha256], ...], tfds}.

    imagefolder / digits: `root` is relative to the data folder (embedded images) or absolute (an external
    image tree) and each key is a path under it. tfds: `tfds` names the dataset and split; keys are tfds ids.
    """
    data_dir = Path(data_dir)
    index = json.loads((data_dir / "index.json").read_text())
    index.setdefault("source", "imagefolder")
    if index["source"] != "tfds":
        root = Path(index["root"])
        index["root_path"] = root if root.is_absolute() else data_dir / root
    return index


def iter_items(index: dict):
    """(global index, absolute path, label, sha256) for every image file the data stage accepted."""
    if index["source"] == "tfds":
        raise ValueError("this data index is a tensorflow-datasets split, not image files")
    root = index["root_path"]
    for i, (rel, label, sha) in enumerate(index["items"]):
        yield i, root / rel, int(label), sha


def iter_images(index: dict, image_size: int, only: set[int] | None = None):
    """(key, label, uint8 HWC array or BadImage) for every example the index names, any source; with
    `only`, for those positions only (the other files are not read; the other tfds records are read, in
    order, but not decoded)."""
    if index["source"] == "tfds":
        from pipelines.sources import iter_tfds

        spec = index["tfds"]
        for position, key, label, data in iter_tfds(spec, 0, spec["num_examples"]):
            if only is not None and position not in only:
                continue
            try:
                yield key, label, decode_image(data, image_size)
            except BadImage as e:
                yield key, label, e
        return
    for i, path, label, sha in iter_items(index):
        if only is not None and i not in only:
            continue
        try:
            data = Path(path).read_bytes()
        except OSError as e:  # a file that vanished or cannot be read since the data stage listed it
            yield str(path), label, BadImage(f"cannot read: {type(e).__name__}: {e}")
            continue
        changed = changed_since_indexed(data, sha)
        try:
            yield str(path), label, BadImage(changed) if changed else decode_image(data, image_size)
        except BadImage as e:
            yield str(path), label, e
