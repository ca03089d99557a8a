"""What every stage shares: params and `--set`, one-line errors, atomic outputs, manifests, hashes.

A stage may read only the params that `dvc.yaml` declares for it: `load_params` returns just those,
so DVC's params tracking and the code cannot disagree without a KeyError in the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[2]


class StageError(Exception):
    """A whole-job input problem (bad param, missing path): reported as one line, exit code 2."""


def fail(message: str) -> None:
    raise StageError(message)


def is_int(v, low: int = 1, high: int | None = None) -> bool:
    """v is an int (not a bool: YAML's true/false) with low <= v, and v < high if given."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v < high)


def is_number(v) -> bool:
    """v is a finite int or float (not a bool, not NaN or Inf)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def cpu_model() -> str:
    """The CPU's model name, with its family/model numbers and widest vector ISA: a VM often shows only
    "AMD EPYC", and this project's train step ran twice as long on a Zen 3 (family 25 model 1, AVX2) as on an
    AVX-512 EPYC of the same name."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break  # the first CPU's block is enough
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    flags = fields.get("flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{fields['model name']} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, {isa})"


def main_guard(fn) -> None:
    """Run a stage's main; turn StageError, and a disk that is full, into one line on stderr and exit code 2."""
    try:
        fn(sys.argv[1:])
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        full = disk_full(e)
        if full is None:
            raise
        stage = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "stage"  # python -m stages.<stage>
        print(f"error: {stage}: no space left on device ({full}); free space and rerun: what was complete is kept "
              "(checkpoints, sample chunks) and the stage continues from it", file=sys.stderr)
        sys.exit(2)


def disk_full(e: BaseException) -> str | None:
    """The path (or the message) of a full disk or quota among an exception and its causes, else None: an
    ENOSPC surfaces as an OSError, or wrapped by Orbax, TensorStore or Beam with only its text."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{e.strerror}: {e.filename}" if e.filename else str(e.strerror)
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text or "RESOURCE_EXHAUSTED: " in text \
                and "write" in text.lower():
            return (text.strip().splitlines() or [""])[0][:300]
        e = e.__cause__ or e.__context__
    return None


def lost_peer(stage: str, e: BaseException, resume: str) -> None:
    """Called with a JaxRuntimeError: in a multi-host job whose collective failed (another process died, or
    its network did), one line and exit 3 at once: JAX's exit handler would otherwise wait at its shutdown
    barrier for the dead process until the heartbeat timeout, then abort with a stack trace. Returns, for the
    caller to re-raise, when the job is one process or the error is a full disk (main_guard's one line)."""
    import jax

    if jax.process_count() == 1 or disk_full(e):
        return
    first = (str(e).strip().splitlines() or [""])[0][:200]
    print(f"error: {stage}: a collective across hosts failed ({type(e).__name__}: {first}): another process died "
          f"or lost the network; rerun every process: {resume}", file=sys.stderr, flush=True)
    os._exit(3)


# ---------------------------------------------------------------------------------------------- params


def declared_params(stage: str, dvc_yaml: Path) -> list[str]:
    spec = yaml.safe_load(dvc_yaml.read_text())
    stages = spec.get("stages", {})
    if stage not in stages:
        fail(f"stage '{stage}' is not declared in {dvc_yaml}")
    keys: list[str] = []
    for entry in stages[stage].get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        else:  # {file: [keys]}
            for v in entry.values():
                keys.extend(v)
    return keys


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _set(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _yaml11_float(old: Any, text: Any) -> float | None:
    """The float a float param's text means where YAML 1.1 read it as a string (1e-6, with no dot), else
    None."""
    if isinstance(old, float) and isinstance(text, str):
        try:
            return float(text)
        except ValueError:
            pass
    return None


def _coerce(key: str, old: Any, raw: str) -> Any:
    if isinstance(old, str):  # a string param takes the text as given: --set sample.num_sampling_steps=250
        return raw
    new = yaml.safe_load(raw)
    if isinstance(new, str) and (f := _yaml11_float(old, raw)) is not None:
        new = f
    if old is None or new is None:
        return new
    if isinstance(old, bool) != isinstance(new, bool):
        fail(f"--set {key}={raw}: expected {type(old).__name__}, got {type(new).__name__}")
    if isinstance(old, float) and isinstance(new, int):
        return float(new)
    if isinstance(old, (int, float, str, list, dict)) and not isinstance(new, type(old)):
        fail(f"--set {key}={raw}: expected {type(old).__name__}, got {type(new).__name__}")
    return new


def project_params(dvc_yaml: Path) -> dict | None:
    """The project's own params file for the pipeline `dvc_yaml` declares (params.yaml, or released/'s),
    matched by the dvc.yaml's bytes; None for a pipeline of the user's own."""
    for folder in (ROOT, ROOT / "released"):
        if (folder / "dvc.yaml").is_file() and (folder / "dvc.yaml").read_bytes() == dvc_yaml.read_bytes():
            return yaml.safe_load((folder / "params.yaml").read_text())
    return None


def check_keys(params: dict, schema: dict, keys: list[str], path: Path) -> None:
    """The declared params of a params file against the project's own (`schema`): one line for a key that
    is missing (a file written before the key existed) or unknown (a misspelling, which would otherwise be
    ignored); a float param that YAML 1.1 read as a string (1e-4, with no dot) becomes the float."""
    def check(prefix: str, user: dict, default: dict, k: str) -> None:  # user[k] against default[k]
        if isinstance(default[k], dict) and isinstance(user[k], dict):
            walk(f"{prefix}{k}.", user[k], default[k])
        elif (f := _yaml11_float(default[k], user[k])) is not None:
            user[k] = f

    def walk(prefix: str, user: dict, default: dict) -> None:
        for k in user:
            if k not in default:
                fail(f"{prefix}{k}: unknown param in {path} ({prefix.rstrip('.')} has: {', '.join(default)})")
        for k in default:
            if k not in user:
                fail(f"{prefix}{k}: missing from {path} (the project's params.yaml has "
                     f"{k}: {json.dumps(default[k])})")
        for k in user:
            check(prefix, user, default, k)

    for key in keys:
        parent, _, leaf = key.rpartition(".")
        try:
            user, default = (_get(params, parent), _get(schema, parent)) if parent else (params, schema)
        except KeyError:
            continue  # a declared section missing from the file is named below
        if isinstance(user, dict) and isinstance(default, dict) and leaf in user and leaf in default:
            check(f"{parent}." if parent else "", user, default, leaf)


def load_params(stage: str, argv: list[str], description: str = "") -> dict:
    """Parse `[--params PATH] [--set key=value ...]`; return the declared subset of params.yaml."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one declared param, e.g. --set train.steps=100")
    args = parser.parse_args(argv)
    path = Path(args.params)
    if not path.is_file():
        fail(f"--params {path}: no such file")
    params = yaml.safe_load(path.read_text()) or {}
    dvc_yaml = path.resolve().parent / "dvc.yaml"
    if not dvc_yaml.is_file():
        dvc_yaml = ROOT / "dvc.yaml"
    keys = declared_params(stage, dvc_yaml)
    schema = project_params(dvc_yaml)
    if schema is not None:
        check_keys(params, schema, keys, path)

    for item in args.set:
        if "=" not in item:
            fail(f"--set {item}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        if not any(key == k or key.startswith(k + ".") for k in keys):
            fail(f"--set {key}: unknown param for stage '{stage}' (declared: {', '.join(keys)})")
        try:
            old = _get(params, key)
        except KeyError:
            fail(f"--set {key}: no such key in {path}")
        _set(params, key, _coerce(key, old, raw))

    view: dict = {}
    for k in keys:
        try:
            _set(view, k, _get(params, k))
        except KeyError:
            fail(f"param '{k}' declared for stage '{stage}' is missing from {path}")
    return view


# How long a multi-host job lives on after a process dies (docs/multihost.md): the coordination service
# declares a process dead after DIT_HEARTBEAT_TIMEOUT_S without a heartbeat, and a process that is ending
# waits at most DIT_SHUTDOWN_TIMEOUT_S for the others at the shutdown barrier.
HEARTBEAT_TIMEOUT_S, SHUTDOWN_TIMEOUT_S = 60, 60


def init_distributed() -> None:
    """Join a multi-host JAX job when the environment asks for one (call before any other JAX use).

    JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID: explicit (CPU hosts talk over gloo);
    JAX_DISTRIBUTED=1: let JAX detect the cluster (TPU pods, SLURM). Otherwise one process.
    """
    import jax

    timeouts = {"heartbeat_timeout_seconds": int(os.environ.get("DIT_HEARTBEAT_TIMEOUT_S", HEARTBEAT_TIMEOUT_S)),
                "shutdown_timeout_seconds": int(os.environ.get("DIT_SHUTDOWN_TIMEOUT_S", SHUTDOWN_TIMEOUT_S))}
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]), **timeouts)
    elif os.environ.get("JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize(**timeouts)


def check_inception_batch(evaluate: dict) -> None:
    batch = evaluate["batch_size"]
    if not is_int(batch):
        fail(f"evaluate.batch_size: expected a positive integer (images per device per call), got {batch!r}")


def load_inception(evaluate: dict, manifest: "Manifest"):
    """The Inception network `evaluate.inception_source` / `inception_path` name, or one line naming them
    (reference, yardsticks, curves and evaluate must all use the same one). Its weights file is recorded
    as the manifest's input "inception", so the audit rehashes it (a replaced graph or TorchScript file is
    named, whether or not DVC tracks it). `evaluate.batch_size` is checked here, before any stage uses it."""
    from dit.backend import conv_compiler_options
    from metrics.inception import InceptionV3

    check_inception_batch(evaluate)
    try:
        inception = InceptionV3.load(evaluate["inception_source"], evaluate["inception_path"],
                                     compiler_options=conv_compiler_options())
    except (FileNotFoundError, ValueError) as e:
        fail(f"evaluate.inception_source/inception_path: {e}")
    manifest.add_input("inception", inception.path)
    return inception


# ---------------------------------------------------------------------------------------------- hashes


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: Path, exclude: tuple[str, ...] = ()) -> str:
    """One hash for a file or a folder: sorted relative paths and their contents."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and rel not in exclude:
            h.update(rel.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def tree_sha256(tree) -> str:
    """Hash of a pytree of arrays in a canonical order (path, dtype, shape, bytes): the same weights give
    the same hash whether they come from the trainer or from an Orbax restore."""
    import jax
    import numpy as np

    from jax.experimental import multihost_utils

    def fetch(leaf):
        # A tree sharded over several hosts (FSDP) is gathered (a collective: every process calls this).
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.is_fully_replicated:
            return multihost_utils.process_allgather(leaf, tiled=True)
        return jax.device_get(leaf)

    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(jax.tree.map(fetch, tree))[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.ascontiguousarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.str}|{arr.shape}\n".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def program_sha256(lowered) -> str:
    """sha256 of a lowered JAX program's StableHLO, as a fingerprint of what the program computes.

    Unlike the bytes of the source files, this stays the same through a refactor, a moved helper or a comment:
    the text carries no source locations, and its function symbols (named after Python functions: @jit_train_step,
    @_attention_core, @closed_call_3) are replaced by their order of first appearance. It changes with the
    computation: the model, the loss, the optimizer and its constants, the dtypes and shapes, the seeds
    closed over, and the version of JAX that lowered it (which may lower the same code differently)."""
    import re

    names: dict[str, str] = {}
    text = re.sub(r"@[\w.$-]+", lambda m: names.setdefault(m.group(0), f"@f{len(names)}"),
                  lowered.as_text(debug_info=False))
    return hashlib.sha256(text.encode()).hexdigest()


def code_version() -> dict:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "--verify", "-q", "HEAD").strip()
    # dirty: a tracked file differs from the commit; DVC's own bookkeeping (dvc.lock, .gitignore) and the
    # results it keeps in git (artifacts/.../metrics.json, train.jsonl) are not code
    changed = [e[3:] for e in git("status", "--porcelain", "-z", "--untracked-files=no").split("\0") if e]
    dirty = any(Path(f).name not in ("dvc.lock", ".gitignore") and "artifacts" not in Path(f).parts
                for f in changed) if commit else None
    return {"git_commit": commit or None, "dirty": dirty}


# ---------------------------------------------------------------------------------------------- outputs


@contextlib.contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Yield a fresh sibling temp folder (.<name>.tmp-<pid>); on success it replaces `final`, on failure it
    is removed. What killed runs left beside `final` is removed first (remove_debris)."""
    final = Path(final)
    tmp = _fresh_sibling(final, "tmp")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def scratch_dir(final: Path | str) -> Iterator[Path]:
    """A work folder beside `final` (.<name>.scratch-<pid>) for files a stage needs only while it runs,
    removed when it ends; what a killed run left there is removed by the next (remove_debris)."""
    tmp = _fresh_sibling(Path(final), "scratch")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fresh_sibling(final: Path, kind: str) -> Path:
    """An empty folder .<name>.<kind>-<pid> beside `final`, after removing what killed runs left there."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_debris(final)
    tmp = final.with_name(f".{final.name}.{kind}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def remove_debris(final: Path | str) -> list[Path]:
    """Remove the temp, old and scratch folders (.<name>.tmp-<pid>, .old-<pid>, .scratch-<pid>) that runs
    killed mid-write (SIGKILL, OOM, a preempted VM) left beside `final`: only those whose process is gone,
    so a run still writing keeps its own. On an ImageNet-sized output each is tens of GB."""
    final = Path(final)
    removed = []
    for p in final.parent.glob(f".{final.name}.*-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.rename(path)


def write_tsv(path: Path, columns, rows: list[dict]) -> None:
    """A table `dvc plots` reads: a header of `columns`, one line per row, None as an empty cell."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join("\t".join(map(str, line)) + "\n" for line in [columns] + [
        ["" if r.get(c) is None else r[c] for c in columns] for r in rows]))
    tmp.rename(path)


class Manifest:
    """Collects what a stage read, did and skipped; written as `manifest.json` in its output."""

    def __init__(self, stage: str, params: dict):
        self.stage = stage
        self.params = params
        self.started = time.time()
        self.inputs: dict[str, str] = {}
        self.input_paths: dict[str, dict] = {}  # how each input was hashed, so the audit can redo it
        self.counts: dict[str, int] = {}
        self.skipped: list[dict] = []
        self.extra: dict[str, Any] = {}

    def add_input(self, name: str, path: Path | str, exclude: tuple[str, ...] = ()) -> str:
        digest = sha256_tree(Path(path), exclude)
        self.inputs[name] = digest
        self.input_paths[name] = {"path": Path(path).as_posix(), "exclude": list(exclude)}
        return digest

    def skip(self, item: str, reason: str) -> None:
        self.skipped.append({"item": str(item), "reason": reason})

    def write(self, out_dir: Path) -> dict:
        from stages.runtime import environment

        doc = {
            "stage": self.stage,
            "params": self.params,
            "inputs_sha256": self.inputs,
            "input_paths": self.input_paths,
            "counts": self.counts,
            "skipped": self.skipped,
            "code": code_version(),
            "environment": environment.record(),
            "wall_time_s": round(time.time() - self.started, 3),
            **self.extra,
        }
        write_json(Path(out_dir) / "manifest.json", doc)
        return doc


def read_manifest(out_dir: Path | str) -> dict:
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        fail(f"{path}: missing; run the upstream stage first (dvc repro)")
    return json.loads(path.read_text())


def require_path(path: Path | str, param: str) -> Path:
    p = Path(path)
    if not p.exists():
        fail(f"{param}: path '{p}' does not exist")
    return p
