"""Every byte the encode job reads or writes goes through Beam's FileSystems.

So a path may be local, `gs://` (apache-beam[gcp]) or `s3://` (apache-beam[aws]) alike, and workers that
share no disk with the launcher (Dataflow, Flink, Spark) reach the same inputs and outputs. Nothing in
pipelines/ calls `open()` on a job path; a test registers its own scheme to prove it.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

from apache_beam.io.filesystems import FileSystems

CHUNK = 1 << 22


class StorageError(ValueError):
    """A whole-job path the job cannot use (unknown scheme, no credentials): said before any work."""


def scheme(path: str) -> str:
    return path.split("://", 1)[0] if "://" in path else ""


def join(base: str, *parts: str) -> str:
    return FileSystems.join(base, *parts)


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path) as f:  # compression is inferred from the name: none for our files
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Write then rename, so a reader never sees half a file (a rename is a copy+delete on GCS)."""
    tmp = _tmp_name(path)
    with FileSystems.create(tmp) as f:
        f.write(data)
    FileSystems.rename([tmp], [path])


def upload(local: str, path: str) -> str:
    """Copy a finished local file to `path` (any scheme), atomically; return its sha256."""
    h = hashlib.sha256()
    tmp = _tmp_name(path)
    with open(local, "rb") as src, FileSystems.create(tmp) as dst:
        while block := src.read(CHUNK):
            h.update(block)
            dst.write(block)
    FileSystems.rename([tmp], [path])
    return h.hexdigest()


def delete(path: str) -> None:
    FileSystems.delete([path])


def _tmp_name(path: str) -> str:
    head, tail = FileSystems.split(path)
    return FileSystems.join(head, f".{tail}.tmp-{os.getpid()}")


# ------------------------------------------------------------------------------------- before any work


def _has_gcp_credentials() -> bool:
    """Credentials Google's clients would find, checked without waiting on the network for long."""
    env = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if env:
        return Path(env).is_file()
    adc = Path(os.environ.get("CLOUDSDK_CONFIG", Path.home() / ".config/gcloud"))
    if (adc / "application_default_credentials.json").is_file():
        return True
    try:  # on GCE / GKE / Dataflow the metadata server answers at once; elsewhere give up after 1 s
        with socket.create_connection(("169.254.169.254", 80), timeout=1.0):
            return True
    except OSError:
        return False


def check_reachable(path: str, param: str) -> None:
    """Raise StorageError naming `param` when `path`'s filesystem cannot be used from here.

    Checked before the job starts: an unknown scheme, a missing Beam extra, or gs:// without credentials
    would otherwise surface (or hang on retries) only inside the workers.
    """
    s = scheme(path)
    if not s or s == "file":
        return
    try:
        FileSystems.get_filesystem(path)
    except ValueError:
        extra = {"gs": "apache-beam[gcp]", "s3": "apache-beam[aws]"}.get(s, f"a FileSystem for {s}://")
        raise StorageError(f"{param}: '{path}' needs {extra}, which is not installed") from None
    if s == "gs" and not _has_gcp_credentials():
        raise StorageError(f"{param}: '{path}' is on GCS but no credentials were found "
                           "(set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`)")
