"""audit: prove, hash by hash, where a reported FID came from.

    python -m stages.audit [artifacts/eval/metrics.json]

Walks metrics -> samples -> checkpoint -> latents -> data and VAE (and reference -> data): recomputes every
hash from the files on disk, restores the EMA weights from the Orbax checkpoint and hashes them, checks
each manifest's recorded inputs, and asks DVC whether any stage in dvc.lock is stale (changed code,
params, inputs or outputs). Prints the chain as a table; exits 1 naming the first link that does not
match, 0 when every link holds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stages.runtime.common import code_version, read_manifest, sha256_file, sha256_tree
from stages.evaluate import UPSTREAM

ARTIFACTS = Path("artifacts")


class Chain:
    def __init__(self):
        self.rows: list[tuple[str, str, str, bool]] = []

    def check(self, link: str, recorded, recomputed) -> bool:
        ok = recorded == recomputed and recorded is not None
        self.rows.append((link, _short(recorded), _short(recomputed), ok))
        return ok

    def note(self, link: str, detail: str, ok: bool) -> None:
        self.rows.append((link, detail, "", ok))

    def first_failure(self) -> str | None:
        return next((r[0] for r in self.rows if not r[3]), None)

    def print(self) -> None:
        w = max(len(r[0]) for r in self.rows)
        print(f"{'link':<{w}}  {'recorded':<16}  {'recomputed':<16}  ok")
        for link, rec, new, ok in self.rows:
            print(f"{link:<{w}}  {rec:<16}  {new:<16}  {'yes' if ok else 'NO'}")


def _short(v) -> str:
    if v is None:
        return "(missing)"
    v = str(v)
    return v[:12] if len(v) in (40, 64) else v


def folder_of(path: str) -> Path | None:
    """The artifacts/<stage output> folder that holds `path` (None for inputs outside artifacts/)."""
    p = Path(path)
    if p.parts[:1] != ("artifacts",) or len(p.parts) < 2:
        return None
    return Path(*p.parts[:2])


def check_manifests(chain: Chain, start: Path) -> None:
    """Recompute every recorded input of `start`'s manifest, then of the manifests upstream of it."""
    seen, queue = set(), [start]
    while queue:
        folder = queue.pop(0)
        if folder in seen:
            continue
        seen.add(folder)
        if not (folder / "manifest.json").is_file():
            chain.check(f"{folder}/manifest.json", "present", None)
            continue
        m = json.loads((folder / "manifest.json").read_text())
        for name, info in sorted(m.get("input_paths", {}).items()):
            path = Path(info["path"])
            now = sha256_tree(path, tuple(info["exclude"])) if path.exists() else None
            chain.check(f"{m['stage']} <- {name} ({path})", m["inputs_sha256"][name], now)
            up = folder_of(info["path"])
            if up is not None:
                queue.append(up)


def check_checkpoint(chain: Chain, samples: dict) -> None:
    """Restore the EMA weights the samples name, and hash them."""
    import jax

    from dit.models import DiTConfig
    from dit.sharding import make_mesh
    from stages.runtime import checkpoint
    from stages.runtime.common import tree_sha256

    ckpt = ARTIFACTS / "checkpoints"
    train = json.loads((ckpt / "manifest.json").read_text())
    chain.check("samples.ema == checkpoints manifest ema", samples["ema_sha256"], train["ema_sha256"])
    step = samples["checkpoint_step"]
    config = DiTConfig(**json.loads((ckpt / "model.json").read_text())["dit"])
    try:
        ema = checkpoint.restore_ema(checkpoint.manager(ckpt), step, config,
                                     make_mesh(1, 1, jax.devices()[:1]))
        got = tree_sha256(ema)
    except Exception as e:  # a missing or damaged step: the link fails, the audit goes on
        got = f"restore failed: {type(e).__name__}"
    chain.check(f"orbax step {step} EMA weights", samples["ema_sha256"], got)


FID_CHAIN = (*UPSTREAM, "yardsticks", "evaluate")  # the stages a reported FID reads, directly or not


def check_dvc(chain: Chain, provenance: dict) -> None:
    """DVC's own view: every stage in dvc.lock up to date, and the lock's out hashes as evaluate saw them."""
    import yaml
    from dvc.repo import Repo

    lock_path = Path("dvc.lock")
    if not lock_path.is_file():
        chain.check("dvc.lock", "present", None)
        return
    lock = yaml.safe_load(lock_path.read_text()).get("stages", {})
    for stage, outs in sorted(provenance.get("dvc_lock", {}).items()):
        now = {o["path"]: o.get("md5") for o in lock.get(stage, {}).get("outs", [])}
        chain.check(f"dvc.lock {stage} outs", _digest(outs), _digest(now))
    with Repo(".") as repo:
        status = repo.status()
    for stage in sorted(set(lock) & set(FID_CHAIN)):  # not curves: a side branch the FID does not read
        changes = status.get(f"dvc.yaml:{stage}") or status.get(stage)
        detail = "up to date" if not changes else "stale: " + _describe(changes)
        chain.note(f"dvc status {stage}", detail, not changes)


def _digest(d: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _describe(changes) -> str:
    parts = []
    for c in changes:
        if isinstance(c, dict):
            for kind, what in c.items():
                parts.append(f"{kind} {', '.join(f'{k}:{v}' for k, v in what.items())}"
                             if isinstance(what, dict) else f"{kind}")
        else:
            parts.append(str(c))
    return "; ".join(parts)


def main(argv: list[str]) -> int:
    metrics_path = Path(argv[0]) if argv else ARTIFACTS / "eval/metrics.json"
    if not metrics_path.is_file():
        print(f"error: {metrics_path}: no such file; run `dvc repro` first", file=sys.stderr)
        return 2
    prov = json.loads(metrics_path.read_text())["provenance"]
    chain = Chain()

    samples_file, ref_file = ARTIFACTS / "samples/samples.npz", ARTIFACTS / "reference/reference.npz"
    chain.check("metrics <- samples.npz", prov["samples_sha256"],
                sha256_file(samples_file) if samples_file.is_file() else None)
    chain.check("metrics <- reference.npz", prov["reference_sha256"],
                sha256_file(ref_file) if ref_file.is_file() else None)
    samples = read_manifest(ARTIFACTS / "samples") if (ARTIFACTS / "samples/manifest.json").is_file() \
        else None
    if samples is None:
        chain.check("artifacts/samples/manifest.json", "present", None)
    else:
        chain.check("metrics.ema == samples manifest ema", prov["ema_sha256"], samples["ema_sha256"])
        chain.check("metrics sampler == samples manifest", _digest(prov["sampler"]),
                    _digest(samples["sampler"]))
        if (ARTIFACTS / "checkpoints/manifest.json").is_file():
            check_checkpoint(chain, samples)
        else:
            chain.check("artifacts/checkpoints/manifest.json", "present", None)
    check_manifests(chain, ARTIFACTS / "eval")
    check_dvc(chain, prov)
    code = code_version()
    chain.note("code", f"metrics from {_short(prov['code']['git_commit'])}"
               f"{' (dirty)' if prov['code']['dirty'] else ''}, now {_short(code['git_commit'])}",
               not prov["code"]["dirty"])

    chain.print()
    first = chain.first_failure()
    if first:
        print(f"audit: FAILED at '{first}'", file=sys.stderr)
        return 1
    print(f"audit: every link from {metrics_path} to the data holds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
