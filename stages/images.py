"""Reading images the way ADM / DiT do: any PIL mode to RGB, then `center_crop_arr`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class BadImage(Exception):
    """One image that cannot be used; the stage skips it and lists the reason in its manifest."""


def open_rgb(path: Path | str, min_size: int = 1) -> tuple[Image.Image, str]:
    """Decode fully (a truncated JPEG fails here, not later) and convert to RGB.

    Returns the image and its original mode, so stages can count conversions (CMYK, L, RGBA, P...).
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            rgb = im.convert("RGB")  # as ADM and DiT: alpha is dropped, CMYK/L/P converted
    except Exception as e:  # PIL raises many types for corrupt files
        raise BadImage(f"cannot decode: {type(e).__name__}: {e}") from None
    if min(rgb.size) < min_size:
        raise BadImage(f"too small: {rgb.size[0]}x{rgb.size[1]} < {min_size}")
    return rgb, mode


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: BOX-halve while at least 2x too big, BICUBIC to size, crop the middle."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    y = (arr.shape[0] - image_size) // 2
    x = (arr.shape[1] - image_size) // 2
    return arr[y:y + image_size, x:x + image_size]


def load_image(path: Path | str, image_size: int, min_size: int = 1) -> np.ndarray:
    """uint8 HWC RGB array of `image_size` square, or BadImage."""
    rgb, _ = open_rgb(path, min_size)
    return center_crop_arr(rgb, image_size)


# ---------------------------------------------------------------------------------- the data index


def read_index(data_dir: Path | str) -> dict:
    """The data stage's `index.json`: {root, classes, items: [[relpath, label, sha256], ...]}.

    `root` is relative to the data folder (embedded images) or absolute (an external image tree).
    """
    data_dir = Path(data_dir)
    index = json.loads((data_dir / "index.json").read_text())
    root = Path(index["root"])
    index["root_path"] = root if root.is_absolute() else data_dir / root
    return index


def iter_items(index: dict):
    """(global index, absolute path, label) for every image the data stage accepted."""
    root = index["root_path"]
    for i, (rel, label, _) in enumerate(index["items"]):
        yield i, root / rel, int(label)
