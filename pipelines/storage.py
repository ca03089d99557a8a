"""Every byte the encode job reads or writes goes through Beam's FileSystems.

So a path may be local, `gs://` (apache-beam[gcp]) or `s3://` (apache-beam[aws]) alike, and workers that
share no disk with the launcher (Dataflow, Flink, Spark) reach the same inputs and outputs. Nothing in
pipelines/ calls `open()` on a job path; a test registers its own scheme to prove it.
"""

from __future__ import annotations

import hashlib
import os
import threading

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

# How long a remote path may take to answer the first check. A bucket answers in a second; a path with no
# route to it makes Google's and Amazon's clients retry with backoff for minutes. Tests shorten it.
REMOTE_TIMEOUT_S = float(os.environ.get("DIT_REMOTE_TIMEOUT_S", "30"))
_DENIED = ("response code 401", "response code 403", "AccessDenied", "Forbidden", "Unauthorized",
           "PermissionDenied", "credentials")


def check_reachable(path: str, param: str, exists=None, timeout: float | None = None) -> None:
    """Raise StorageError naming `param` when `path`'s filesystem cannot be used from here.

    Checked before the job starts, by asking the path's own client whether it exists: `exists(path)`, the
    check of whatever will read the path (tensorflow-datasets passes etils' epath; by default Beam's
    FileSystems, which also says when a Beam extra is missing). Every way a remote path fails is then one
    line: no DNS, no route (a timeout), no credentials or no access (401/403), no such bucket (404), a
    scheme with no filesystem. A path that is missing inside an existing bucket is not an error here.
    """
    s = scheme(path)
    if not s or s == "file":
        return
    if exists is None:
        try:
            FileSystems.get_filesystem(path)
        except ValueError:
            extra = {"gs": "apache-beam[gcp]", "s3": "apache-beam[aws]"}.get(s, f"a FileSystem for {s}://")
            raise StorageError(f"{param}: '{path}' needs {extra}, which is not installed") from None
        exists = FileSystems.exists
    timeout = REMOTE_TIMEOUT_S if timeout is None else timeout
    if _answer(exists, path, param, timeout):
        return
    bucket = f"{s}://{path.split('://', 1)[1].split('/', 1)[0]}"
    if bucket != path.rstrip("/") and not _answer(exists, bucket, param, timeout):
        raise StorageError(f"{param}: '{path}': the bucket {bucket} does not exist (or is not visible to "
                           "these credentials)")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (clients put whole HTTP bodies and stacks after it)."""
    return (str(e).strip().splitlines() or [""])[0][:300]


def _answer(exists, path: str, param: str, timeout: float) -> bool:
    """exists(path), or StorageError naming `param` when it raises or does not answer within `timeout`."""
    out: dict = {}

    def ask():
        try:
            out["found"] = bool(exists(path))
        except BaseException as e:  # whatever the client raises: the reason is its first line
            out["error"] = e

    worker = threading.Thread(target=ask, daemon=True)  # a client stuck in its retries is left behind
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise StorageError(f"{param}: '{path}' did not answer within {timeout:g} s (no route to the storage "
                           "service, or a proxy or firewall in the way; DIT_REMOTE_TIMEOUT_S sets the wait)")
    if "error" in out:
        e = out["error"]
        reason = first_line(e)
        hint = ("; check the credentials (GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default "
                "login`, AWS_PROFILE) and the bucket's permissions") if any(d in reason for d in _DENIED) else ""
        raise StorageError(f"{param}: '{path}' cannot be read ({type(e).__name__}: {reason}){hint}")
    return out["found"]
