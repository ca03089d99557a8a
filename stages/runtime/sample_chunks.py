"""The sample stage's work folder: a pure chunk planner, chunk files written tmp-then-rename, a streaming
merge into ADM's `samples.npz`.

Chunk k holds samples [k*B, (k+1)*B) for the per-device batch B: it is exactly what one device computes
in one call, so its bytes do not depend on which device, host or step computed it. A chunk file is
`chunk-<k>.npz` (images, labels) beside `chunk-<k>.sha256`, written after it: a chunk counts as finished
only when its hash record exists and matches, so a file half-written by a killed run is never taken for
a finished one. The folder's `fingerprint.json` says what the chunks were made from; other inputs move
the folder aside.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry times: the same samples give the same npz bytes


def num_chunks(num_samples: int, per_device: int) -> int:
    return -(-num_samples // per_device)


def plan(pending: list[int], devices: int) -> list[list[int | None]]:
    """Steps of `devices` chunk ids each (None pads the last step): device d of step s computes
    plan[s][d]. Any assignment gives the same bytes; this one keeps every device busy."""
    steps = []
    for s in range(0, len(pending), devices):
        step: list[int | None] = list(pending[s:s + devices])
        steps.append(step + [None] * (devices - len(step)))
    return steps


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ChunkStore:
    root: Path

    def chunk_path(self, k: int) -> Path:
        return self.root / f"chunk-{k:06d}.npz"

    def record_path(self, k: int) -> Path:
        return self.root / f"chunk-{k:06d}.sha256"

    def open(self, fingerprint: dict) -> str | None:
        """Make the folder ready for `fingerprint`. Returns a one-line note when finished work made from
        other inputs was moved aside (to `<root>.stale`), else None. Stray temp files are removed."""
        fp_path = self.root / "fingerprint.json"
        note = None
        has_work = self.root.is_dir() and any(self.root.glob("chunk-*"))
        if self.root.exists() and (fp_path.is_file() or has_work):
            old = json.loads(fp_path.read_text()) if fp_path.is_file() else None
            if old != fingerprint:
                stale = self.root.with_name(self.root.name + ".stale")
                shutil.rmtree(stale, ignore_errors=True)
                self.root.rename(stale)
                what = ", ".join(k for k in sorted(set(old or {}) | set(fingerprint))
                                 if (old or {}).get(k) != fingerprint.get(k)) or "fingerprint"
                note = (f"sample: finished chunks in {self.root} were made from other inputs ({what}); "
                        f"moved aside to {stale}, starting fresh")
        self.root.mkdir(parents=True, exist_ok=True)
        for tmp in self.root.glob(".*.tmp*"):
            tmp.unlink(missing_ok=True)
        if not fp_path.is_file():
            tmp = fp_path.with_name(".fingerprint.json.tmp")
            tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, fp_path)
        return note

    def scan(self, total: int) -> tuple[list[int], list[dict]]:
        """(finished chunk ids, problems): a chunk with a record that does not match is a problem, to be
        recomputed; a chunk file without a record was cut off before it was finished."""
        done, problems = [], []
        for k in range(total):
            path, rec = self.chunk_path(k), self.record_path(k)
            if not rec.is_file():
                if path.is_file():
                    path.unlink()
                continue
            want = rec.read_text().strip()
            got = _sha256(path.read_bytes()) if path.is_file() else None
            if got == want:
                done.append(k)
            else:
                problems.append({"item": path.name,
                                 "reason": "missing" if got is None else "sha256 does not match its record; recomputed"})
                rec.unlink()
                path.unlink(missing_ok=True)
        return done, problems

    def write(self, k: int, images: np.ndarray, labels: np.ndarray) -> None:
        buf = io.BytesIO()
        _write_npz(buf, {"images": images, "labels": labels})
        data = buf.getvalue()
        path, rec = self.chunk_path(k), self.record_path(k)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        tmp = rec.with_name(f".{rec.name}.tmp{os.getpid()}")
        tmp.write_text(_sha256(data) + "\n")
        os.replace(tmp, rec)

    def read(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.chunk_path(k), allow_pickle=False) as z:
            return z["images"], z["labels"]


def _write_npz(f, arrays: dict[str, np.ndarray]) -> None:
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            with zf.open(zipfile.ZipInfo(f"{name}.npy", ZIP_TIME), "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.ascontiguousarray(arr), allow_pickle=False)


def _npy_entry(zf: zipfile.ZipFile, name: str, dtype, shape: tuple):
    """An open zip entry `name.npy` with its .npy header written; the caller streams the raw data."""
    out = zf.open(zipfile.ZipInfo(f"{name}.npy", ZIP_TIME), "w", force_zip64=True)
    np.lib.format.write_array_header_1_0(out, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return out


def merge(store: ChunkStore, num_samples: int, per_device: int, out_path: Path, on_chunk=None) -> None:
    """ADM's samples.npz (arr_0 uint8 NHWC, arr_1 int labels) in sample order, streamed chunk by chunk in
    one pass: memory holds one chunk of images (and the labels, 4 bytes a sample), whatever num_samples.
    `on_chunk(start, images, labels)` sees each piece."""
    first_images, first_labels = store.read(0)
    shape, label_dtype = first_images.shape[1:], first_labels.dtype
    del first_images, first_labels
    labels_all = []
    with zipfile.ZipFile(out_path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with _npy_entry(zf, "arr_0", np.uint8, (num_samples, *shape)) as out:
            for k in range(num_chunks(num_samples, per_device)):
                images, labels = store.read(k)
                keep = min(per_device, num_samples - k * per_device)
                out.write(np.ascontiguousarray(images[:keep], dtype=np.uint8).tobytes())
                labels_all.append(labels[:keep])
                if on_chunk is not None:
                    on_chunk(k * per_device, images[:keep], labels[:keep])
        with _npy_entry(zf, "arr_1", label_dtype, (num_samples,)) as out:
            out.write(np.ascontiguousarray(np.concatenate(labels_all), dtype=label_dtype).tobytes())
