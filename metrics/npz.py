"""ADM batch files (.npz): read arrays lazily and without unpickling, write them atomically.

ADM's batches hold `arr_0` (N, H, W, 3) uint8 images and, for references, `mu`, `sigma`, `mu_s`,
`sigma_s`. A 50k-image batch is ~10 GB at 256 px, so `arr_0` is streamed from the zip member in batches
(as ADM's StreamingNpzArrayReader does) instead of being loaded whole; the small arrays go through
`np.load(allow_pickle=False)`, which reads one member per key.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from metrics.errors import MetricsInputError


def _open_zip(path: str | os.PathLike) -> zipfile.ZipFile:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such batch file (expected an ADM-format .npz)")
    try:
        return zipfile.ZipFile(path, "r")
    except zipfile.BadZipFile:
        raise MetricsInputError(f"{path}: not an .npz (zip) file") from None


def keys(path: str | os.PathLike) -> list[str]:
    with _open_zip(path) as z:
        return [n[:-4] for n in z.namelist() if n.endswith(".npy")]


def _read_header(f, path, name) -> tuple[tuple, bool, np.dtype] | None:
    """(shape, fortran_order, dtype) from a .npy header, or None for a format version we don't stream."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        header = np.lib.format.read_array_header_1_0(f, max_header_size=100_000)
    elif version == (2, 0):
        header = np.lib.format.read_array_header_2_0(f, max_header_size=100_000)
    else:
        return None
    shape, fortran, dtype = header
    if dtype.hasobject:
        raise MetricsInputError(f"{path}: '{name}' is an object array (pickled data); refusing to "
                                "unpickle it: write plain numeric arrays")
    return shape, fortran, dtype


def array_info(path: str | os.PathLike, name: str) -> tuple[tuple, np.dtype]:
    """Shape and dtype of one member, from its header only."""
    with _open_zip(path) as z:
        if f"{name}.npy" not in z.namelist():
            raise MetricsInputError(f"{path}: has no '{name}' array (keys: {keys(path)})")
        with z.open(f"{name}.npy") as f:
            header = _read_header(f, path, name)
    if header is None:
        arr = load(path, name)
        return arr.shape, arr.dtype
    return header[0], header[2]


def load(path: str | os.PathLike, name: str) -> np.ndarray:
    """One (small) member, fully read, never unpickled."""
    _open_zip(path).close()  # a clear error for a missing or non-zip file
    try:
        with np.load(path, allow_pickle=False) as npz:
            if name not in npz.files:
                raise MetricsInputError(f"{path}: has no '{name}' array (keys: {npz.files})")
            return npz[name]
    except ValueError as e:
        if isinstance(e, MetricsInputError):
            raise
        raise MetricsInputError(f"{path}: cannot read '{name}' without unpickling ({e})") from None


def iter_batches(path: str | os.PathLike, name: str, batch_size: int) -> Iterator[np.ndarray]:
    """Yield consecutive row batches of one member, reading only those rows from the file."""
    with _open_zip(path) as z:
        if f"{name}.npy" not in z.namelist():
            raise MetricsInputError(f"{path}: has no '{name}' array")
        with z.open(f"{name}.npy") as f:
            header = _read_header(f, path, name)
            if header is None or header[1] or header[2].itemsize == 0:  # odd layouts: read it whole
                arr = load(path, name)
                for start in range(0, len(arr), batch_size):
                    yield arr[start:start + batch_size]
                return
            shape, _, dtype = header
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise MetricsInputError(f"{path}: '{name}' is truncated (rows {start}..{start + n})")
                yield np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:]))


def write_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to a temp file beside `path`, then rename: a killed writer leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
