"""Reading images the way ADM / DiT do: any PIL mode to RGB, then `center_crop_arr`.

Shared by the data stage (which checks every file once), the encode job and the reference stage, so all
three see the same pixels. Images arrive as bytes (read through pipelines.storage, or from a
tensorflow-datasets example), never by opening a path here.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}

# 16-bit and 32-bit modes: PIL's convert("RGB") clips them at 255 (a 16-bit scan turns white), so they
# are scaled to 8 bits first.
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": None}


class BadImage(Exception):
    """One image that cannot be used; the stage skips it and lists the reason in its manifest."""


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in _WIDE_MODES:
        arr = np.asarray(im, np.float64)
        top = _WIDE_MODES[im.mode] or max(float(arr.max()), 1.0)
        if im.mode == "I" and arr.max() <= 255:  # some decoders widen 8-bit grey to "I"
            top = 255
        im = Image.fromarray(np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")  # as ADM and DiT: alpha dropped, CMYK / L / P / LA converted


def decode_rgb(data: bytes, min_size: int = 1) -> tuple[Image.Image, str]:
    """Decode fully (a truncated JPEG fails here, not later) and convert to RGB.

    Returns the image and its original mode, so stages can count conversions (CMYK, L, RGBA, P, I;16...).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
            rgb = _to_rgb(im)
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


def decode_image(data: bytes, image_size: int, min_size: int = 1) -> np.ndarray:
    """uint8 HWC RGB array of `image_size` square, or BadImage."""
    rgb, _ = decode_rgb(data, min_size)
    return center_crop_arr(rgb, image_size)


def read_image(path: str, image_size: int, min_size: int = 1) -> np.ndarray:
    """`decode_image` of a file on any Beam FileSystem; a missing or unreadable file is a BadImage."""
    from pipelines import storage

    try:
        data = storage.read_bytes(str(path))
    except Exception as e:  # BeamIOError, OSError: the file went away after indexing
        raise BadImage(f"cannot read: {type(e).__name__}: {e}") from None
    return decode_image(data, image_size, min_size)


def changed_since_indexed(data: bytes, sha256: str | None = None) -> str | None:
    """None if `data` is what the data stage hashed (or no hash was recorded), else the reason to skip it:
    an image replaced after the index was made would be encoded under the old image's provenance."""
    if not sha256:
        return None
    got = hashlib.sha256(data).hexdigest()
    if got == sha256:
        return None
    return f"changed since the data stage: sha256 {got[:12]}, index.json has {sha256[:12]}"
