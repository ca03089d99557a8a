"""The train stage's work folder and Orbax layout, shared by train (writes), sample and audit (read the EMA).

    artifacts/checkpoints/        a DVC `persist: true` output: `dvc repro` leaves it for the next run
      run.json                    the fingerprint of what the run is trained from (written first)
      orbax/<step>/{ema,state,meta}   the last KEEP_LAST full states (state: params + optimizer state;
                                  meta: the fingerprint and the log's running sums)
      kept/<step>/ema             every train.keep_every-th step's EMA, kept for good (FID-vs-steps curves)
      model.json, manifest.json   written last, when the run completes; the manifest is the commit mark

A checkpoint folder is resumed only when its fingerprint matches: the latents' hash, the root seed, every
train.* param except RESULT_NEUTRAL, and what the code computes, as content rather than as file bytes: the
lowered programs of the init and the step (train_step.TrainSetup.program_sha256) and what the loader feeds
them (loader.order_sha256). So a refactor, a comment or a moved file resumes the run, and a changed loss,
model, optimizer or batch order starts it fresh (a run resumed across such a change would end with weights
neither version gives). A folder of another fingerprint is moved aside whole (never mixed in), with a line
that says what differs, and the source files changed since it started when the programs differ.
What dead trainers left beside the folder (.checkpoints.tmp-<pid>, .old-<pid>) is removed by
common.remove_debris; Orbax removes its own tmp steps. No RNG or data-iterator state is saved: the step key
is fold_in(key, step) and the data position is the step (stages/runtime/loader.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from stages.runtime.common import ROOT

KEEP_LAST = 3
FORMAT = 3  # bump when the layout or the meaning of a step changes: old folders are then moved aside
# Params that do not change the trained weights: how long (a longer run continues a shorter one), how
# often to log or save, how the data is read, and the mesh (a preempted job may resume on another slice;
# only the order of floating-point sums across devices differs).
# remat recomputes activations in the backward pass with the same bytes (tests/test_fingerprints.py).
RESULT_NEUTRAL = ("steps", "log_every", "ckpt_every", "keep_every", "num_workers", "mesh", "cpu_devices",
                  "peak_tflops", "remat")
SOURCE_DIRS = ("stages", "dit", "pipelines")  # named when the programs differ (sources), not fingerprinted


# ------------------------------------------------------------------------------------- the fingerprint


def identity(latents_sha256: str, params: dict, programs: dict, data_sha256: str) -> dict:
    """What a run's weights are a function of."""
    train = {k: v for k, v in sorted(params["train"].items()) if k not in RESULT_NEUTRAL}
    return {"format": FORMAT, "latents_sha256": latents_sha256, "seed": params["seed"], "train": train,
            "program_sha256": programs, "data_sha256": data_sha256}


def sources() -> dict:
    """{path: sha256} of the project's Python files, kept in run.json beside the fingerprint (not in it) so a
    run that must start fresh because its programs changed can say which files changed since it started."""
    return {p.relative_to(ROOT).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))}


def changed_sources(old: dict | None) -> list[str]:
    now = sources()
    return sorted(k for k in set(old or {}) | set(now) if (old or {}).get(k) != now.get(k)) if old else []


def fingerprint(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def differences(old: dict, new: dict, old_sources: dict | None = None) -> str:
    """'train.lr 0.001 -> 0.002, program_sha256.step '3f2a..' -> '9c1e..' (changed since: dit/models.py)' for
    the one line that says why a run starts fresh (sha256s shortened to 12 hex digits)."""
    short = lambda v: v[:12] if isinstance(v, str) and len(v) == 64 else v
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k} {short(a.get(k))!r} -> {short(b.get(k))!r}" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key} {short(a)!r} -> {short(b)!r}")
    changed = changed_sources(old_sources) if old.get("program_sha256") != new.get("program_sha256") else []
    if changed:
        out.append(f"(changed since: {', '.join(changed[:8])}{', ...' if len(changed) > 8 else ''})")
    return ", ".join(out) or "fingerprint differs"


def read_run(ckpt_dir: Path) -> dict | None:
    path = Path(ckpt_dir) / "run.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def _unused(base: Path) -> Path:
    """`base`, or `base-2`, `base-3`, ... the first that does not exist yet (its parent made): nothing moved
    aside is ever overwritten."""
    dest, n = base, 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


def move_aside(ckpt_dir: Path, log: Path, fp: str) -> Path:
    """Move a run's folder (and its log) to artifacts/checkpoints.aside/<fingerprint>[-n]/."""
    ckpt_dir = Path(ckpt_dir)
    dest = _unused(ckpt_dir.with_name(ckpt_dir.name + ".aside") / (fp[:12] or "unknown"))
    ckpt_dir.rename(dest)
    for f in (Path(log), Path(log).with_suffix(".tsv")):
        if f.is_file():
            f.rename(dest / f.name)
    return dest


# ------------------------------------------------------------------------------------- disk space


def space_checked() -> bool:
    """The disk-space checks of the train stage are on unless DIT_SPACE_CHECK=0 (a bucket behind FUSE reports
    free space that means nothing: docs/faults.md)."""
    import os

    return os.environ.get("DIT_SPACE_CHECK", "1") != "0"


def tree_bytes(tree) -> int:
    """The raw bytes of a tree's arrays (or ShapeDtypeStructs)."""
    import math

    import jax

    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else 0


def free_bytes(path: Path) -> int:
    import shutil

    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def space_needed(ckpt_dir: Path, abstract_state: dict, start: int, steps: int, keep_every: int | None) -> tuple:
    """(bytes the run's checkpoints still need, what of it is rolling states, kept EMAs). Orbax writes a new
    rolling step before it deletes the oldest, so KEEP_LAST + 1 full states coexist; every keep_every-th step
    still to come adds an EMA kept for good. Sizes are the arrays' raw bytes (Orbax stores them about as
    is); the whole checkpoint is assumed to sit on one filesystem (a shared one, or one host's)."""
    full, ema = tree_bytes(abstract_state), tree_bytes(abstract_state["ema"])
    on_disk = sum(folder_bytes(p) for p in (Path(ckpt_dir) / "orbax").glob("[0-9]*"))
    rolling = max(0, (KEEP_LAST + 1) * full - on_disk)
    have = {int(p.name) for p in (Path(ckpt_dir) / "kept").glob("[0-9]*")}
    future = [s for s in range(start + 1, steps + 1) if keep_every and s % keep_every == 0 and s not in have]
    return rolling + len(future) * ema, (KEEP_LAST + 1, full), (len(future), ema)


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 27 else f"{n / 2 ** 20:.1f} MiB"


# ------------------------------------------------------------------------------------- Orbax managers


def _open(folder: Path, options: dict):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(**options) if options else None
    return ocp.CheckpointManager(folder.resolve(), options=opts)


def manager(ckpt_dir: Path, **options):
    """The rolling full states (`orbax/`); with no options, a reader's manager."""
    return _open(Path(ckpt_dir) / "orbax", options)


def kept_manager(ckpt_dir: Path, **options):
    """The EMAs kept for good every train.keep_every steps (`kept/`); with no options, a reader's manager."""
    return _open(Path(ckpt_dir) / "kept", options)


def writers(ckpt_dir: Path, keep_every: int | None):
    """The trainer's two managers: rolling full states, and (keep_every set) the EMAs kept for good.
    Saves are asynchronous (Orbax's default): the step loop goes on while a checkpoint is written.
    Orbax removes the tmp folders of saves a dead run left unfinished (cleanup_tmp_directories)."""
    rolling = manager(ckpt_dir, max_to_keep=KEEP_LAST, create=True, cleanup_tmp_directories=True)
    kept = kept_manager(ckpt_dir, create=True, cleanup_tmp_directories=True) if keep_every else None
    return rolling, kept


def save(mgr, kept, step: int, state: dict, meta: dict, ckpt_dir: Path) -> None:
    """Save step's full state (and its EMA in `kept`, when given), with the arrays' checksums in the step's
    meta item (integrity.checksums: per leaf, summed over every process's shards, nothing gathered). The
    trainer decides when (every train.ckpt_every steps, the last step, a stop signal), so Orbax's own
    interval policy is not used. A kept EMA already there (retraining re-reached its step) is verified
    against this one instead of saved again."""
    import orbax.checkpoint as ocp

    from stages.runtime.integrity import checksums, sealed

    sums = {"ema": checksums(state["ema"]),
            "state": checksums({"params": state["params"], "opt_state": state["opt_state"]})}
    if kept is not None:
        save_kept(kept, step, state["ema"], sums["ema"], ckpt_dir)
    mgr.save(step, args=ocp.args.Composite(
        ema=ocp.args.StandardSave(state["ema"]),
        state=ocp.args.StandardSave({"params": state["params"], "opt_state": state["opt_state"]}),
        meta=ocp.args.JsonSave(sealed({**meta, "checksums": sums}))), force=True)


def save_kept(kept, step: int, ema, ema_sums: dict, ckpt_dir: Path) -> None:
    import orbax.checkpoint as ocp

    from stages.runtime.integrity import sealed

    if step in kept.all_steps():
        kept.wait_until_finished()
        try:
            _, meta = read_ema(kept, step, _abstract(ema))
            if meta["checksums"]["ema"] == ema_sums:
                return  # the same EMA: nothing to save
            reason = "its EMA differs from the one retraining recomputed"
        except Exception as e:  # Damaged, or unreadable
            reason = f"{type(e).__name__}: {_first_line(e)}"
        dest = move_damaged(ckpt_dir, "kept", step, reason)
        print(f"train: {Path(ckpt_dir) / 'kept' / str(step)}: {reason}; moved to {dest}, saving it again")
        kept.reload()
    kept.save(step, args=ocp.args.Composite(ema=ocp.args.StandardSave(ema),
                                            meta=ocp.args.JsonSave(sealed({"checksums": {"ema": ema_sums}}))),
              force=True)


def _abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def move_damaged(ckpt_dir: Path, sub: str, step: int, reason: str) -> Path | None:
    """Move `<ckpt_dir>/<sub>/<step>` (a step that does not restore or verify) to
    `<ckpt_dir>.damaged/<sub>-<step>[-n]/`, outside the DVC output (so `dvc push` does not upload it), with
    the reason beside it: kept for inspection, never deleted. Process 0 moves; returns where to (None on
    other processes)."""
    import jax

    if jax.process_index() != 0:
        return None
    src = Path(ckpt_dir) / sub / str(step)
    dest = _unused(Path(ckpt_dir).with_name(Path(ckpt_dir).name + ".damaged") / f"{sub}-{step}")
    src.rename(dest)
    (dest.parent / f"{dest.name}.reason.txt").write_text(reason + "\n")
    return dest


def agree(ok: bool) -> bool:
    """True when `ok` holds on every process (a collective on several)."""
    import jax

    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).all())


def restore_newest(ckpt_dir: Path, steps: list[int], abstract_state: dict, fp: str) -> tuple:
    """(step, state, meta, damaged) of the newest of `steps` that restores and verifies (checksums, meta
    hash, fingerprint). Each step that does not is moved aside (move_damaged) and listed in `damaged` as
    {step, reason, moved_to}; (0, None, None, damaged) when none does. A step whose parameter tree is
    another model's is not damage: that raises StageError (one line naming the step and the leaf)."""
    from stages.runtime.common import fail
    from stages.runtime.integrity import Damaged, verify

    damaged = []
    for step in sorted(steps, reverse=True):
        mgr = manager(ckpt_dir)
        where = Path(ckpt_dir) / "orbax" / str(step)
        try:
            diff = check_fits(ckpt_dir, step, abstract_state["params"])
        except Exception as e:  # unreadable array metadata
            diff, reason = None, f"cannot read its metadata ({type(e).__name__}: {_first_line(e)})"
        else:
            reason = None
        if diff:
            fail(f"{where}: {diff}: a checkpoint folder from another model config; move it aside")
        state = meta = None
        if reason is None:
            try:
                state, meta = restore(mgr, step, abstract_state)
                if meta.get("fingerprint") != fp:
                    raise Damaged("its fingerprint differs from run.json's")
                verify(meta, {"ema": state["ema"], "state": {"params": state["params"],
                                                             "opt_state": state["opt_state"]}})
            except Exception as e:  # Damaged, or a read TensorStore / Orbax refuses
                reason = _first_line(e) if isinstance(e, Damaged) else f"{type(e).__name__}: {_first_line(e)}"
        if agree(reason is None):
            return step, state, meta, damaged
        reason = reason or "another process could not restore it"
        dest = move_damaged(ckpt_dir, "orbax", step, reason)
        agree(True)  # every process waits for the move
        print(f"train: {where} does not restore ({reason}); moved to {dest}, trying the step before", flush=True)
        damaged.append({"step": step, "reason": reason, "moved_to": str(dest) if dest else None})
    return 0, None, None, damaged


def read_ema(mgr, step: int, abstract_ema) -> tuple:
    """(EMA, meta) of `step` (a rolling or a kept step), verified against the checksums its meta recorded
    (integrity.Damaged when they differ)."""
    import orbax.checkpoint as ocp

    from stages.runtime.integrity import verify

    got = mgr.restore(step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(abstract_ema),
                                                    meta=ocp.args.JsonRestore()))
    verify(got["meta"], {"ema": got["ema"]})
    return got["ema"], got["meta"]


def check_fits(ckpt_dir: Path, step: int, abstract_params) -> str | None:
    """None when step's EMA has the parameter tree and shapes of this run's model, else the first leaf
    that differs (a folder from another model config). Reads Orbax's metadata only; the optimizer
    state mirrors the parameters, and any other mismatch makes the restore itself fail."""
    import jax
    import orbax.checkpoint as ocp

    path = (Path(ckpt_dir) / "orbax" / str(step) / "ema").resolve()
    meta = ocp.StandardCheckpointer().metadata(path)
    have = {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(getattr(meta, "item_metadata", meta))[0]}
    if not have:  # Orbax reads unreadable item metadata as nothing (with a warning): damage, not a config
        from stages.runtime.integrity import Damaged

        raise Damaged("its EMA item's metadata is missing or unreadable")
    want = {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    for k in sorted(set(want) | set(have)):
        if want.get(k) != have.get(k):
            return f"ema{k}: checkpoint has {have.get(k, 'nothing')}, the model config needs {want.get(k, 'nothing')}"
    return None


def restore(mgr, step: int, abstract_state: dict) -> tuple[dict, dict]:
    """(state, meta) of `step`, placed by the shardings in abstract_state (this run's mesh, whatever
    mesh wrote it)."""
    import orbax.checkpoint as ocp

    got = mgr.restore(step, args=ocp.args.Composite(
        ema=ocp.args.StandardRestore(abstract_state["ema"]),
        state=ocp.args.StandardRestore({"params": abstract_state["params"],
                                        "opt_state": abstract_state["opt_state"]}),
        meta=ocp.args.JsonRestore()))
    state = {"params": got["state"]["params"], "ema": got["ema"], "opt_state": got["state"]["opt_state"]}
    return state, got["meta"]


def restore_ema(mgr, step: int, config, mesh):
    """The EMA weights of `step`, replicated on the reader's own mesh (sample, curves, audit), verified
    against the checksums saved with them (integrity.Damaged when not)."""
    import jax

    from dit.models import init_params
    from dit.sharding import replicated_abstract

    abstract = replicated_abstract(mesh, jax.eval_shape(lambda k: init_params(config, k),
                                                        jax.random.key(0)))
    return read_ema(mgr, step, abstract)[0]


def final_ema(ckpt_dir: Path, train_manifest: dict, config, mesh) -> tuple:
    """(step, EMA) of the step the train manifest names, for sample, curves and the audit: never another
    step in its place. A step that is missing or does not restore and verify is one line naming it."""
    from stages.runtime.common import fail

    step = int(train_manifest["final_step"])
    where = Path(ckpt_dir) / "orbax" / str(step)
    if not where.is_dir():
        fail(f"{where}: the step the train manifest names is missing (moved aside as damaged?); rerun the "
             "train stage")
    try:
        return step, restore_ema(manager(ckpt_dir), step, config, mesh)
    except Exception as e:  # integrity.Damaged, a read TensorStore refuses, another model's tree
        fail(f"{where}: cannot restore its EMA weights ({type(e).__name__}: {_first_line(e)}); rerun the train "
             "stage, which resumes from the newest intact step")
