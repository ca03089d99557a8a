"""A result's files: the workspace's, or those of a git revision or `dvc exp` experiment, without touching the
workspace (the audit's --rev): git's files by `git show`, DVC's outputs linked from the cache into a temporary
folder by the md5s of that revision's dvc.lock, fetched from the remote first when the cache lacks what one
FID needs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from stages.runtime.common import fail
from stages.tools.experiments import exp_show, git_show, list_experiments


def fid_targets(step: int) -> list[str]:
    """What one FID needs pulled: samples, reference, yardsticks, evaluate, and the EMA of `step`."""
    ema = f"artifacts/checkpoints/orbax/{step}"
    return ["artifacts/samples", "artifacts/reference", "artifacts/yardsticks", "artifacts/eval/manifest.json",
            "artifacts/checkpoints/manifest.json", "artifacts/checkpoints/model.json",
            f"{ema}/ema", f"{ema}/meta", f"{ema}/_CHECKPOINT_METADATA"]


class Tree:
    """Where a result's files are: the workspace (root "."), or a folder of links into DVC's cache (--rev).
    Knows the DVC outputs of a dvc.lock, and which of them are pulled."""

    def __init__(self, root: Path, lock: dict):
        self.root, self.lock = root, lock
        self.outs = {o["path"]: o.get("md5") for s in lock.values() for o in s.get("outs", [])}
        self._repo = None

    def object(self, md5: str) -> Path:
        if self._repo is None:
            from dvc.repo import Repo

            self._repo = Repo(".")
        return Path(self._repo.cache.local.oid_to_path(md5))

    def listing(self, out: str) -> list[dict] | None:
        md5 = self.outs.get(out) or ""
        obj = self.object(md5) if md5.endswith(".dir") else None
        return json.loads(obj.read_text()) if obj is not None and obj.is_file() else None

    def out_of(self, path) -> str | None:
        p = Path(path).as_posix()
        return next((o for o in self.outs if p == o or p.startswith(o + "/")), None)

    def stage_of(self, out: str) -> str | None:
        return next((n for n, s in self.lock.items() if any(o["path"] == out for o in s.get("outs", []))), None)

    def path(self, path) -> Path:
        return self.root / path if self.out_of(path) else Path(path)

    def missing(self, path) -> str | None:
        """"not pulled" / "partly pulled" for a DVC output (or a path inside one) whose files are absent."""
        out = self.out_of(path)
        if out is None:
            return None
        files = self.listing(out)
        if files is None:
            return None if self.path(path).exists() else "not pulled"
        sub = Path(path).relative_to(out).as_posix()
        mine = [f for f in files if sub == "." or f["relpath"] == sub or f["relpath"].startswith(sub + "/")]
        absent = sum(not (self.root / out / f["relpath"]).exists() for f in mine)
        return None if not absent else "not pulled" if absent == len(mine) else \
            f"partly pulled ({len(mine) - absent}/{len(mine)} files)"


def resolve(rev: str) -> str:
    proc = subprocess.run(["git", "rev-parse", "--verify", "-q", f"{rev}^{{commit}}"], capture_output=True,
                          text=True)
    if proc.returncode == 0:
        return proc.stdout.strip()
    exp = list_experiments(exp_show()).get(rev)
    if exp is None:
        fail(f"--rev {rev}: no such git revision or DVC experiment")
    if exp["state"] != "success" or not exp["rev"]:
        fail(f"--rev {rev}: experiment is {exp['state']}, with no metrics")
    return exp["rev"]


def at_revision(rev: str, sha: str, metrics: str, root: Path) -> tuple[Tree, dict]:
    """The revision's metrics and dvc.lock from git, its DVC outputs linked from the cache into `root`,
    fetching what one FID needs from the remote first if the cache lacks it."""
    text = git_show(sha, f"./{metrics}")
    if text is None:
        fail(f"--rev {rev}: no {metrics} at {sha[:12]} (an experiment that did not reach evaluate?)")
    doc = json.loads(text)
    tree = Tree(root, (yaml.safe_load(git_show(sha, "./dvc.lock") or "") or {}).get("stages", {}))

    def objects(out: str) -> list[tuple[str, str]] | None:  # (relpath, md5) of its files; None: no listing
        md5 = tree.outs.get(out) or ""
        if not md5.endswith(".dir"):
            return [("", md5)] if md5 else []
        files = tree.listing(out)
        return None if files is None else [(f["relpath"], f["md5"]) for f in files]

    def under(out: str, rel: str, target: str) -> bool:
        p = f"{out}/{rel}".rstrip("/")
        return p == target or p.startswith(target + "/")

    def absent(target: str) -> bool:  # some file of `target` is not in the cache
        out = tree.out_of(target)
        files = objects(out)
        return files is None or any(not tree.object(md5).is_file() for rel, md5 in files if under(out, rel, target))

    need = [t for t in fid_targets(doc["provenance"]["checkpoint_step"]) if tree.out_of(t)]
    if any(absent(t) for t in need):
        import logging

        from dvc.repo import Repo

        root_level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # Beam's import warns of GCP clients it does not need here
        from pipelines.storage import StorageError, check_reachable, first_line

        logging.getLogger().setLevel(root_level)
        for name in ("dvc", "dvc_data", "dvc_objects"):  # their warnings: this tool says it in one line
            logging.getLogger(name).setLevel(logging.CRITICAL)
        with Repo(".") as repo:
            name = repo.config["core"].get("remote")
            url = repo.config["remote"].get(name, {}).get("url") if name else None
            where = f"remote '{name}' ({url})" if name else "no remote"
            try:
                if url:  # a bucket that does not answer: one line within DIT_REMOTE_TIMEOUT_S, not DVC's retries
                    remote = repo.cloud.get_remote(name)
                    check_reachable(url, f"--rev {rev}: {where}", exists=remote.fs.exists)
                repo.fetch(targets=need, revs=[sha], workspace=False)
                error = ""
            except StorageError as e:
                fail(str(e))
            except Exception as e:  # no remote, or one that refuses
                error = f": {first_line(e) or type(e).__name__}"
        lacking = [t for t in need if absent(t)]
        if lacking:
            fail(f"--rev {rev}: {lacking[0]} is not in the DVC cache, and fetching it from {where} failed "
                 f"(unreachable, or never pushed){error}")
    for out in tree.outs:  # an out whole if the cache has all of it, else only what one FID needs
        files = objects(out) or []
        whole = all(tree.object(md5).is_file() for _, md5 in files)
        for rel, md5 in files:
            dst, obj = root / out / rel, tree.object(md5)
            if not whole and not any(under(out, rel, t) for t in need):
                continue
            if obj.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(obj)
            elif not rel and (kept := git_show(sha, f"./{out}")) is not None:  # cache: false, kept in git
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_text(kept)
    return tree, doc
