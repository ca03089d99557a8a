"""audit: prove, hash by hash, where a reported FID came from, on the author's machine or a reviewer's.

    python -m stages.audit [artifacts/eval/metrics.json] [--recompute] [--rev REV]

Walks metrics -> samples -> checkpoint -> latents -> data and VAE (and reference -> data): recomputes every
hash from the files, restores the EMA weights from the Orbax checkpoint and hashes them, checks each
manifest's recorded inputs, and asks DVC whether any stage of the FID's chain is stale. A DVC output that was
not pulled (a reviewer's targeted `dvc pull`) is "not pulled": its hash is checked against dvc.lock instead.
Prints the environment each result was made in beside this one (a difference is a WARNING: the hashes
decide), then the chain as a table; exits 1 naming the first link that does not hold, 0 when every link holds,
2 on bad input (a --rev that does not exist, an experiment without metrics, a remote that cannot be reached).

--recompute evaluates the samples against the reference again (metrics.adm.evaluate, with the Inception
weights the metrics name, checked against their recorded hash): the same bytes are required in the recorded
environment, and elsewhere a FID within FEATURE_RTOL's bound (docs/publishing.md).
--rev REV audits the FID of a git revision or a `dvc exp` experiment without touching the workspace: files
from git, DVC outputs linked from the cache by that revision's dvc.lock (fetched from the remote if absent).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from stages.evaluate import UPSTREAM
from stages.runtime import environment
from stages.runtime.common import StageError, code_version, fail, sha256_tree
from stages.tools.experiments import METRICS
from stages.tools.revision import Tree, at_revision, fid_targets, resolve

FID_CHAIN = (*UPSTREAM, "yardsticks", "evaluate")  # the stages a reported FID reads, directly or not
# Inception features of one image differ by float rounding on another CPU, core count or XLA: 1e-5 relative
# bounds it (docs/determinism.md, "another batch"); FID_BOUND turns it into a bound on FID (docs/publishing.md)
FEATURE_RTOL = 1e-5
FID_BOUND = 4  # |dFID| <= FID_BOUND * FEATURE_RTOL * (|mu_s|^2 + tr S_s + |mu_r|^2 + tr S_r), first order


class Chain:
    def __init__(self, tree: Tree, prov: dict):
        self.tree, self.prov = tree, prov
        self.rows: list[tuple[str, str, str, str]] = []  # link, recorded, recomputed, status
        self.manifests: dict[str, dict] = {}  # folder -> manifest, as the walk read them

    def check(self, link: str, recorded, recomputed) -> bool:
        ok = recorded == recomputed and recorded is not None
        self.rows.append((link, _short(recorded), _short(recomputed), "yes" if ok else "NO"))
        return ok

    def note(self, link: str, detail: str, ok: bool) -> None:
        self.rows.append((link, detail, "", "yes" if ok else "NO"))

    def file(self, link: str, recorded, path, exclude: tuple[str, ...] = ()) -> None:
        """recorded == the hash of `path`; a DVC output not pulled is checked against dvc.lock instead."""
        why = self.tree.missing(path)
        if why is None:
            full = self.tree.path(path)
            self.check(link, recorded, sha256_tree(full, exclude) if full.exists() else None)
            return
        out = self.tree.out_of(path)
        was = self.prov.get("dvc_lock", {}).get(self.tree.stage_of(out) or "", {}).get(out, "in dvc.lock")
        now = self.tree.outs.get(out)
        ok = now is not None and was in (now, "in dvc.lock")
        self.rows.append((f"{link}: dvc.lock {out}", _short(was), _short(now), why if ok else "NO"))

    def first_failure(self) -> str | None:
        return next((r[0] for r in self.rows if r[3] == "NO"), None)

    def print(self) -> None:
        w = max(len(r[0]) for r in self.rows)
        print(f"{'link':<{w}}  {'recorded':<16}  {'recomputed':<16}  ok")
        for link, rec, new, status in self.rows:
            print(f"{link:<{w}}  {rec:<16}  {new:<16}  {status}")


def _short(v) -> str:
    if v is None:
        return "(missing)"
    v = str(v)
    return v[:12] if len(v) in (40, 64) or v.endswith(".dir") else v


def folder_of(path: str) -> Path | None:
    """The artifacts/<stage output> folder that holds `path` (None for inputs outside artifacts/)."""
    p = Path(path)
    if p.parts[:1] != ("artifacts",) or len(p.parts) < 2:
        return None
    return Path(*p.parts[:2])


def _elsewhere(path: Path, name: str, manifest: dict) -> Path | None:
    """This machine's copy of an input recorded outside the repo at a path absent here: the Inception
    weights the params name (the installed default_1.pt sits in each machine's own venv)."""
    cfg = manifest.get("params", {}).get("evaluate", {})
    if name == "inception" and cfg.get("inception_path") is None and cfg.get("inception_source") == "torchscript":
        from metrics.inception_weights import default_torchscript_path

        return default_torchscript_path()
    return None


def check_manifests(chain: Chain, start: Path) -> None:
    """Recompute every recorded input of `start`'s manifest, then of the manifests upstream of it."""
    seen, queue = set(), [start]
    while queue:
        folder = queue.pop(0)
        if folder in seen:
            continue
        seen.add(folder)
        where = folder / "manifest.json"
        if chain.tree.missing(where) or not chain.tree.path(where).is_file():
            chain.file(f"{where}", "present", where)
            continue
        m = json.loads(chain.tree.path(where).read_text())
        chain.manifests[str(folder)] = m
        for name, info in sorted(m.get("input_paths", {}).items()):
            path = Path(info["path"])
            if chain.tree.out_of(path) is None and not path.exists() and path.is_absolute():
                here = _elsewhere(path, name, m)
                if here is None:
                    chain.rows.append((f"{m['stage']} <- {name} ({path})", _short(m["inputs_sha256"][name]),
                                       "", "not on this machine"))
                    continue
                path = here
            chain.file(f"{m['stage']} <- {name} ({path})", m["inputs_sha256"][name], path, tuple(info["exclude"]))
            up = folder_of(info["path"])
            if up is not None:
                queue.append(up)


def check_checkpoint(chain: Chain, samples: dict) -> None:
    """Restore the EMA weights the samples name, and hash them."""
    ckpt, step = Path("artifacts/checkpoints"), samples["checkpoint_step"]
    need = [ckpt / "manifest.json", ckpt / "model.json", ckpt / f"orbax/{step}/ema", ckpt / f"orbax/{step}/meta"]
    absent = next((p for p in need if chain.tree.missing(p)), None)
    if absent is not None:
        chain.file(f"orbax step {step} EMA weights", None, absent)
        return
    import jax

    from dit.models import DiTConfig
    from dit.sharding import make_mesh
    from stages.runtime import checkpoint
    from stages.runtime.common import tree_sha256

    ckpt = chain.tree.path(ckpt)
    train = json.loads((ckpt / "manifest.json").read_text())
    chain.check("samples.ema == checkpoints manifest ema", samples["ema_sha256"], train["ema_sha256"])
    config = DiTConfig(**json.loads((ckpt / "model.json").read_text())["dit"])
    try:
        ema = checkpoint.restore_ema(checkpoint.manager(ckpt), step, config, make_mesh(1, 1, jax.devices()[:1]))
        got = tree_sha256(ema)
    except Exception as e:  # a missing or damaged step: the link fails, the audit goes on
        got = f"restore failed: {type(e).__name__}"
    chain.check(f"orbax step {step} EMA weights", samples["ema_sha256"], got)


def _digest(d: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def check_dvc(chain: Chain, workspace: bool) -> None:
    """DVC's own view: the lock's out hashes as evaluate saw them, and (in the workspace) every stage of the
    chain up to date, where a change that is only data not pulled is no change."""
    tree = chain.tree
    if not tree.lock:
        chain.check("dvc.lock", "present", None)
        return
    for stage, outs in sorted(chain.prov.get("dvc_lock", {}).items()):
        now = {o["path"]: o.get("md5") for o in tree.lock.get(stage, {}).get("outs", [])}
        chain.check(f"dvc.lock {stage} outs", _digest(outs), _digest(now))
    if not workspace:
        chain.note("dvc status", "not run at a revision: its dvc.lock hashes are checked above", True)
        return
    from dvc.repo import Repo

    with Repo(".") as repo:
        status = repo.status()
    for stage in sorted(set(tree.lock) & set(FID_CHAIN)):  # not curves: a side branch the FID does not read
        changes = status.get(f"dvc.yaml:{stage}") or status.get(stage) or []
        stale, absent = [], []
        for c in changes:
            for kind, what in (c.items() if isinstance(c, dict) else [(str(c), None)]):
                for path, state in (what.items() if isinstance(what, dict) else [("", what)]):
                    pulled = state in ("deleted", "not in cache", "modified") and tree.missing(path)
                    (absent if pulled else stale).append(f"{kind} {path}:{state}" if path else kind)
        detail = "stale: " + "; ".join(stale) if stale else \
            f"up to date but for data not pulled ({len(absent)})" if absent else "up to date"
        chain.note(f"dvc status {stage}", detail, not stale)


BOOKKEEPING = ("dvc.lock", ".gitignore")


def check_code(chain: Chain, rev: str | None) -> None:
    code = chain.prov["code"]
    commit, dirty = code["git_commit"], code["dirty"]
    if rev is None:
        now = code_version()["git_commit"]
        chain.note("code", f"metrics from {_short(commit)}{' (dirty)' if dirty else ''}, now {_short(now)}",
                   not dirty)
        return
    # an experiment runs on its baseline's code with changed params: dirty, and its commit holds the change
    changed = subprocess.run(["git", "diff", "--name-only", str(commit), rev], capture_output=True,
                             text=True).stdout.split() if dirty else []
    code_files = [f for f in changed if Path(f).name not in BOOKKEEPING and "artifacts" not in Path(f).parts
                  and not (Path(f).name.startswith("params") and f.endswith(".yaml"))]
    chain.note("code", f"metrics from {_short(commit)}{' + params' if dirty else ''}, revision {_short(rev)}"
               + (f"; code changed: {', '.join(code_files[:3])}" if code_files else ""),
               bool(commit) and not code_files)


def check_environments(chain: Chain, recorded: dict | None) -> list[str]:
    """Print the environment evaluate recorded beside this one, then each manifest's differences; return
    the differences that can change bytes (none: --recompute requires the same bytes)."""
    now = environment.record()
    old = recorded or {}
    flat_old, flat_now = environment.flat(old), environment.flat(now)
    print(f"{'environment':<28}  {'recorded (evaluate)':<56}  this machine")
    for k in sorted(set(flat_old) | set(flat_now)):
        print(f"{environment.label(k):<28}  {str(flat_old.get(k)):<56}  {flat_now.get(k)}")
    warnings = [f"evaluate ran with {d}" for d in environment.diff(recorded, now)]
    own = tuple(k for k in now if k != "jax")  # a stage sets its own JAX devices (train.cpu_devices, ...)
    for folder, m in chain.manifests.items():
        warnings += [f"{m['stage']} ({folder}) ran with {d}" for d in environment.diff(m.get("environment"), now, own)]
    print("".join(f"WARNING: environment: {w}\n" for w in warnings)
          + f"environment: metrics.json and {len(chain.manifests)} manifests against this machine: "
          f"{len(warnings)} differences (warnings: the hashes decide)\n")
    return environment.diff(recorded, now, environment.BYTE_KEYS)


def fid_tolerance(ref_npz: Path, key: str) -> float:
    """FID_BOUND * FEATURE_RTOL * T, T the squared feature norms of both batches; the reference's T stands for
    the samples' (the same network on images of the same size)."""
    import numpy as np

    with np.load(ref_npz) as r:
        mu, sigma = r["mu" if key == "fid" else "mu_s"], r["sigma" if key == "fid" else "sigma_s"]
        t = float(mu @ mu + np.trace(sigma))
    return FID_BOUND * FEATURE_RTOL * 2 * t


def recompute(chain: Chain, doc: dict, differs: list[str]) -> None:
    """The metrics again from the pulled samples and reference, with the Inception weights they name."""
    from metrics.adm import evaluate
    from stages.runtime.common import Manifest, load_inception

    tree, prov = chain.tree, doc["provenance"]
    samples, ref = tree.path("artifacts/samples/samples.npz"), tree.path("artifacts/reference/reference.npz")
    cfg = chain.manifests.get("artifacts/eval", {}).get("params", {}).get("evaluate")
    if cfg is None:
        fail("--recompute needs artifacts/eval/manifest.json (its evaluate params): dvc pull it")
    probe = Manifest("audit", {})
    try:
        inception = load_inception(cfg, probe)
    except StageError as e:
        fail(f"--recompute needs the Inception weights the metrics name ({cfg['inception_source']}): {e}")
    print(f"recompute: Inception weights ({inception.source}) {inception.path}")
    chain.check(f"recompute: Inception weights ({inception.source})", prov["inception"]["weights_sha256"],
                inception.weights_sha256)
    got = evaluate(str(ref), str(samples), inception, batch_size=cfg["batch_size"], fid_method=prov["fid_method"])
    for key, new in got.items():
        old = doc["metrics"].get(key)
        if not differs:
            chain.check(f"recompute {key} (same environment: bytes)", repr(old), repr(new))
        elif key in ("fid", "sfid") and old is not None and new is not None:
            tol = fid_tolerance(ref, key)
            chain.note(f"recompute {key} (another environment)",
                       f"{old!r} -> {new!r}: |diff| {abs(new - old):.3g} <= {tol:.3g}", abs(new - old) <= tol)
        else:
            chain.note(f"recompute {key} (another environment)", f"{old!r} -> {new!r} (not judged)", True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="?", default=METRICS, help=f"the metrics to audit (default: {METRICS})")
    parser.add_argument("--recompute", action="store_true",
                        help="evaluate the samples again and compare with the metrics")
    parser.add_argument("--rev", help="audit the FID of this git revision or dvc experiment, not the workspace's")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="audit-rev-") as tmp:
            return audit(args, Path(tmp))
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def audit(args, tmp: Path) -> int:
    metrics_path = Path(args.metrics)
    if args.rev:
        sha = resolve(args.rev)
        tree, doc = at_revision(args.rev, sha, metrics_path.as_posix(), tmp)
    else:
        sha = None
        if not metrics_path.is_file():
            fail(f"{metrics_path}: no such file; run `dvc repro` first, or `dvc pull` a published result")
        doc = json.loads(metrics_path.read_text())
        lock = Path("dvc.lock")
        tree = Tree(Path("."), (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {})
    prov = doc["provenance"]
    chain = Chain(tree, prov)
    if args.recompute and any(tree.missing(p) for p in ("artifacts/samples", "artifacts/reference")):
        fail("--recompute needs the samples and the reference: dvc pull artifacts/samples artifacts/reference")

    chain.file("metrics <- samples.npz", prov["samples_sha256"], "artifacts/samples/samples.npz")
    chain.file("metrics <- reference.npz", prov["reference_sha256"], "artifacts/reference/reference.npz")
    where = "artifacts/samples/manifest.json"
    if tree.missing(where) or not tree.path(where).is_file():
        chain.file(where, "present", where)
    else:
        samples = json.loads(tree.path(where).read_text())
        chain.check("metrics.ema == samples manifest ema", prov["ema_sha256"], samples["ema_sha256"])
        chain.check("metrics sampler == samples manifest", _digest(prov["sampler"]), _digest(samples["sampler"]))
        check_checkpoint(chain, samples)
    check_manifests(chain, Path("artifacts/eval"))
    check_dvc(chain, workspace=sha is None)
    check_code(chain, sha)
    differs = check_environments(chain, prov.get("environment"))
    if args.recompute:
        recompute(chain, doc, differs)

    chain.print()
    absent = [r for r in chain.rows if "pulled" in r[3]]
    if absent:
        print(f"audit: {len(absent)} links not pulled, checked against dvc.lock; to check what one FID needs by "
              f"its files: dvc pull {' '.join(fid_targets(prov['checkpoint_step']))}")
    first = chain.first_failure()
    if first:
        print(f"audit: FAILED at '{first}'", file=sys.stderr)
        return 1
    print(f"audit: every link from {metrics_path}{f' at {args.rev}' if args.rev else ''} to the data holds")
    return 0
