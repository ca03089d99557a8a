"""DVC experiments and sweep files, as the sweep and the scaling report (and the audit of another revision)
read them: `dvc exp show --json`, files of a git revision, and `sweeps/<name>.yaml`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from stages.runtime.common import ROOT, fail

METRICS = "artifacts/eval/metrics.json"
SWEEPS = ROOT / "sweeps"


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        fail(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return proc.stdout


def exp_show(all_commits: bool = False) -> list[dict]:
    return json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json", "--no-fetch"]
                          + (["--all-commits"] if all_commits else [])) or "[]")


def list_experiments(shown: list[dict]) -> dict[str, dict]:
    """{name: {rev, state, baseline}} for every experiment `dvc exp show --json` lists (queued, running
    and failed ones included), newest baseline first; a name seen twice keeps the first."""
    found: dict[str, dict] = {}
    for baseline in shown:
        if baseline.get("rev") == "workspace":
            continue
        for rng in baseline.get("experiments") or []:
            revs = rng.get("revs") or []
            name = rng.get("name") or (revs[0].get("name") if revs else None)
            if not name or name in found:
                continue
            executor = rng.get("executor") or {}
            found[name] = {"rev": revs[0]["rev"] if revs else None,
                           "state": executor.get("state") or "success",
                           "baseline": baseline.get("rev")}
    return found


def git_show(rev: str, path: str) -> str | None:
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def load_sweep(name: str) -> dict:
    """A sweep by name (sweeps/<name>.yaml) or path, checked: {description, set, configs}."""
    path = Path(name)
    if not path.suffix:
        local = Path("sweeps") / f"{name}.yaml"  # the repo being run first, then this checkout's
        path = local if local.is_file() else SWEEPS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SWEEPS.glob("*.yaml"))
        fail(f"sweep '{name}': no such file {path} (known: {', '.join(known)})")
    doc = yaml.safe_load(path.read_text()) or {}
    configs, common = doc.get("configs"), doc.get("set") or {}
    if not isinstance(configs, dict) or not configs:
        fail(f"{path}: 'configs' must map experiment names to param overrides")
    if not isinstance(common, dict):
        fail(f"{path}: 'set' must map params to values")
    for exp, over in configs.items():
        if not isinstance(exp, str) or not exp.replace("-", "").replace("_", "").isalnum():
            fail(f"{path}: experiment name {exp!r}: use letters, digits, '-' and '_' (a git ref name)")
        if not isinstance(over, dict):
            fail(f"{path}: configs.{exp} must map params to values")
    return {"path": str(path), "description": doc.get("description", ""), "set": common,
            "configs": {k: {**common, **v} for k, v in configs.items()}}
