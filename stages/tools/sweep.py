"""Run a named sweep as DVC experiments, then the scaling report.

    python -m stages.sweep scaling|blocks|FILE [--queue] [--dry-run] [--force] [-S key=value ...] [--no-report]

A sweep is a YAML file in `sweeps/` (or any path): `configs` maps an experiment name to its param
overrides, `set` holds overrides shared by all of them. Each config becomes one DVC experiment, a full
`dvc repro` of the pipeline with those params (`dvc exp run --temp -n NAME -S key=value ...`), run one
after another in DVC's temporary folders, so the workspace and its params.yaml are left as they were.
The stages a config does not change (data, vae, encode, reference, yardsticks) are restored from DVC's
run cache instead of rerun: the whole sweep computes them once.

An experiment that already finished (its metrics in its commit) with the params asked for now is not run
again, so a stopped sweep continues where it stopped; one that finished with other values (an edited sweep
file, or `-S train.steps=6000` after a 3000-step sweep) is rerun, naming the params that differ. `--force`
reruns everything. `--queue` only queues the experiments
(`dvc exp run --queue`); start them with `dvc queue start -j 1` and, once `dvc queue status` shows them
done, draw the report with `python -m stages.scaling --sweep NAME`. The report goes to `artifacts/scaling/` for
the `scaling` sweep and to `artifacts/scaling-<name>/` for another. `--dry-run` prints the commands (and
what it would keep), running nothing.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from stages.runtime.common import StageError, fail
from stages.tools.experiments import METRICS, exp_show, git_show, list_experiments, load_sweep

def report_dir(sweep: str) -> Path:
    """artifacts/scaling for the `scaling` sweep, artifacts/scaling-<name> for another (blocks, ...)."""
    stem = Path(sweep).stem
    return Path("artifacts/scaling" if stem == "scaling" else f"artifacts/scaling-{stem}")


def _value(v) -> str:
    return "null" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))


def exp_command(name: str, overrides: dict, queue: bool, force: bool) -> list[str]:
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "--queue" if queue else "--temp", "-n", name]
    for key in sorted(overrides):
        cmd += ["-S", f"{key}={_value(overrides[key])}"]
    return cmd + (["-f"] if force else [])


def finished() -> dict[str, tuple[str, str | None]]:
    """{experiment name: (state, rev)} for the experiments of HEAD that DVC knows."""
    out = {}
    for name, info in list_experiments(exp_show()).items():
        done = info["state"] == "success" and info["rev"] and git_show(info["rev"], METRICS) is not None
        out[name] = ("done" if done else info["state"], info["rev"])
    return out


def changed_params(rev: str, overrides: dict) -> list[str]:
    """'train.steps 3000 -> 6000' for each override whose value differs from the experiment's params.yaml
    (values read as YAML, as `dvc exp run -S` writes them)."""
    from stages.runtime.common import _get

    params = yaml.safe_load(git_show(rev, "params.yaml") or "") or {}
    out = []
    for key in sorted(overrides):
        want = yaml.safe_load(_value(overrides[key]))
        try:
            have = _get(params, key)
        except KeyError:
            have = None
        if have != want:
            out.append(f"{key} {have!r} -> {want!r}")
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="sweep name (sweeps/<name>.yaml: scaling, blocks) or a YAML path")
    parser.add_argument("--queue", action="store_true", help="only queue them (then: dvc queue start)")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc commands, run nothing")
    parser.add_argument("--force", action="store_true", help="rerun experiments that already finished")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more override for every experiment, e.g. -S train.steps=1000")
    parser.add_argument("--no-report", action="store_true", help="do not run stages.tools.scaling afterwards")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        extra = {}
        for item in args.set:
            if "=" not in item:
                fail(f"-S {item}: expected KEY=VALUE")
            k, v = item.split("=", 1)
            extra[k] = v
        state = finished()
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sweep {args.sweep}: {sweep['description']} ({len(sweep['configs'])} experiments)")
    failed, t_sweep = [], time.time()
    for name in sorted(sweep["configs"]):
        overrides = {**sweep["configs"][name], **extra}
        status, rev = state.get(name, (None, None))
        if status == "done" and not args.force:
            differ = changed_params(rev, overrides)
            if not differ:
                print(f"sweep: {name} finished before; kept (--force reruns it)")
                continue
            print(f"sweep: {name} finished with other params ({', '.join(differ)}); rerunning it")
        cmd = exp_command(name, overrides, args.queue, force=args.force or name in state)
        print("$ " + shlex.join(["dvc"] + cmd[3:]), flush=True)
        if args.dry_run:
            continue
        t0 = time.time()
        proc = subprocess.run(cmd)
        print(f"sweep: {name} {'ok' if proc.returncode == 0 else f'FAILED ({proc.returncode})'} in "
              f"{time.time() - t0:.0f} s", flush=True)
        if proc.returncode:
            failed.append(name)
    if args.dry_run:
        return 0
    if args.queue:
        print(f"queued; run them with: dvc queue start -j 1   then: python -m stages.scaling --sweep "
              f"{args.sweep} --out {report_dir(args.sweep)}")
        return 0
    print(f"sweep {args.sweep}: {time.time() - t_sweep:.0f} s, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else ""), flush=True)
    rc = 0
    if not args.no_report:
        from stages.tools.scaling import main as report

        rc = report(["--sweep", args.sweep, "--out", str(report_dir(args.sweep))])
    return 1 if failed else rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
