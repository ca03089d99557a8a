"""The scaling report: DVC experiments gathered into the paper's scaling figures.

    python -m stages.scaling [--exps NAME ...] [--sweep scaling|blocks|FILE] [--all-commits] [--out DIR]

Reads the experiments of the current commit (`dvc exp show --json`; every commit with `--all-commits`),
each experiment's `artifacts/eval/metrics.json` and `params.yaml` from its git commit, and writes to
`artifacts/scaling/`:

- `scaling.json`: one row per experiment (name, model, block, patch, params, gflops, train_compute,
  steps, fid, sfid, precision, recall, is, and the yardsticks rfid / fid_floor when the pipeline computed
  them), sorted by name; experiments without metrics (queued, running, failed, or named but never run) are
  rows with `status: "missing"` and the reason, never dropped; the log-log fit of FID on Gflops (slope,
  Spearman correlation).
- `fid_vs_gflops.png` (the paper's Figure 8 / 9 axes), `fid_vs_steps.png` (one line per config,
  Figure 2 / 6), `fid_vs_compute.png` (Figure 9), `samples_grid.png` (the same sample indices, so the
  same noise and labels, across configs: Figure 7), read from each experiment's `samples.npz` in the DVC
  cache; an experiment whose samples are not reachable is named in `scaling.json` (`grid.skipped`).

FIDs are comparable only when measured alike (PROTOCOL): one reference batch, one Inception network, one
sample count, sampler and guidance scale. When the experiments differ in any, the FID figures are not
drawn, the groups are named on stderr and in `scaling.json`, and the exit code is 2.

Deterministic: the same experiments give the same bytes (sorted rows, no clock, PNGs without a software
or date stamp), so a second run changes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import yaml

from stages.runtime.common import StageError, fail, write_json, write_tsv
from stages.tools.experiments import METRICS, exp_show, git_show, list_experiments, load_sweep
from stages.tools.scaling_figures import plot_curves, plot_fid_vs, samples_grid

OUT = Path("artifacts/scaling")
CURVES = "artifacts/curves"
# the columns of the printed table and of scaling.tsv
TABLE_COLUMNS = ("name", "config", "params", "gflops", "train_compute", "steps", "fid", "sfid", "precision",
                 "recall", "rfid", "fid_floor")


# ---------------------------------------------------------------------------------------------- gather


def sweep_names(sweep: str) -> list[str]:
    return sorted(load_sweep(sweep)["configs"])


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def model_name(train: dict) -> str:
    """`DiT-S/2` for a named config, else `d{depth}-w{width}` (the patch is its own column)."""
    if train.get("model"):
        return train["model"].split("/")[0]
    return f"d{train.get('depth')}-w{train.get('hidden_size')}"


def patch_of(train: dict) -> int | None:
    if train.get("model"):
        return int(train["model"].rsplit("/", 1)[1])
    return train.get("patch_size")


def make_row(name: str, info: dict | None) -> dict:
    """One experiment's row; `status` is "ok" or "missing" (with `reason`)."""
    row = {"name": name, "status": "missing", "reason": None, "rev": None}
    if info is None:
        row["reason"] = "not found in dvc exp show (never run, or removed)"
        return row
    row["rev"] = info["rev"]
    if info["state"] != "success":
        row["reason"] = f"experiment {info['state']}"
        return row
    text = git_show(info["rev"], METRICS)
    if text is None:
        row["reason"] = f"no {METRICS} in its commit (the evaluate stage did not finish)"
        return row
    metrics_doc = json.loads(text)
    params = yaml.safe_load(git_show(info["rev"], "params.yaml") or "{}") or {}
    train, sample = params.get("train", {}), params.get("sample", {})
    m, cost, prov = metrics_doc.get("metrics", {}), metrics_doc.get("cost") or {}, metrics_doc.get("provenance", {})
    yard = metrics_doc.get("yardsticks") or {}
    row.update({
        "status": "ok",
        "model": model_name(train),
        "block": train.get("block"),
        "patch": patch_of(train),
        "config": f"{model_name(train)}/{patch_of(train)} {train.get('block')}",
        "params": cost.get("params"),
        "gflops": _num(cost.get("gflops")),
        "train_compute": _num(cost.get("train_gflops")),  # Gflops x 3 x batch x steps (the paper's)
        "sample_gflops_per_image": _num(cost.get("sample_gflops_per_image")),
        "steps": prov.get("checkpoint_step"),
        "batch": train.get("global_batch_size"),
        "sampler": sample.get("num_sampling_steps"),
        "cfg_scale": sample.get("cfg_scale"),
        "num_samples": prov.get("num_samples"),
        "fid": _num(m.get("fid")),
        "fid_method": prov.get("fid_method", "sqrtm"),  # evaluate.fid_method (runs before it: sqrtm)
        "sfid": _num(m.get("sfid")),
        "precision": _num(m.get("precision")),
        "recall": _num(m.get("recall")),
        "is": _num(m.get("inception_score")),
        "rfid": _num(m.get("rfid", (yard.get("rfid") or {}).get("fid"))),
        "fid_floor": _num(m.get("fid_floor", (yard.get("floor") or {}).get("fid"))),
        "reference_sha256": prov.get("reference_sha256"),
        "inception_sha256": (prov.get("inception") or {}).get("weights_sha256"),
        **read_curves(info["rev"], (params.get("curves") or {}).get("num_samples")),
    })
    return row


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _tsv(text: str | None) -> list[dict]:
    """Rows of a curves TSV; numbers as numbers, the sampler name as written ("100", "dpm++25")."""
    if not text:
        return []
    head, *lines = [line.split("\t") for line in text.splitlines() if line]
    return [{h: v if h == "sampler" else _value(v) for h, v in zip(head, line)} for line in lines]


def read_curves(rev: str, num_samples) -> dict:
    """The experiment's curves stage output (FID vs training step, FID vs sampling Gflops), [] when its
    pipeline had no curves stage."""
    return {"curve_samples": num_samples,
            "curve_steps": _tsv(git_show(rev, f"{CURVES}/fid_vs_step.tsv")),
            "curve_sampling": _tsv(git_show(rev, f"{CURVES}/fid_vs_sampling.tsv"))}


def gather(exps: list[str] | None, sweep: str | None, all_commits: bool) -> list[dict]:
    found = list_experiments(exp_show(all_commits))
    names = set(exps or []) | set(sweep_names(sweep) if sweep else [])
    if not names:
        names = set(found)
    return sorted((make_row(n, found.get(n)) for n in names), key=lambda r: r["name"])


# ---------------------------------------------------------------------------------------------- analyse


PROTOCOL = ("reference_sha256", "inception_sha256", "num_samples", "sampler", "cfg_scale")


def comparable_groups(rows: list[dict]) -> list[dict]:
    """Rows with a FID grouped by how the FID was measured (reference batch, Inception weights, sample
    count, sampler, guidance scale: each moves FID by itself); one group = comparable."""
    groups: dict[tuple, list[str]] = {}
    for r in rows:
        if r["status"] == "ok" and r["fid"] is not None:
            groups.setdefault(tuple(r.get(k) for k in PROTOCOL), []).append(r["name"])
    name = {"inception_sha256": "inception_weights_sha256"}
    return [{**{name.get(k, k): v for k, v in zip(PROTOCOL, key)}, "experiments": sorted(names)}
            for key, names in sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0]))]


def fit_fid_on_gflops(rows: list[dict]) -> dict | None:
    """log10 FID = intercept + slope * log10 Gflops (least squares) and Spearman's rho of the two."""
    pts = [(r["gflops"], r["fid"]) for r in rows if r["gflops"] and r["fid"] and r["fid"] > 0]
    if len(pts) < 2:
        return None
    from scipy.stats import spearmanr

    x, y = np.log10([p[0] for p in pts]), np.log10([p[1] for p in pts])
    slope, intercept = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (float("nan"), float("nan"))
    rho = spearmanr([p[0] for p in pts], [p[1] for p in pts]).statistic if len(pts) > 2 else (
        float(np.sign((pts[1][0] - pts[0][0]) * (pts[1][1] - pts[0][1]))))
    r6 = lambda v: None if not math.isfinite(float(v)) else round(float(v), 6)
    return {"n": len(pts), "slope": r6(slope), "intercept": r6(intercept), "spearman": r6(rho),
            "gflops_span": round(max(p[0] for p in pts) / min(p[0] for p in pts), 3)}


# ---------------------------------------------------------------------------------------------- main


def report(rows: list[dict], out: Path) -> tuple[dict, list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in rows if r["status"] == "ok"]
    groups = comparable_groups(rows)
    refused = len(groups) > 1
    fit = None if refused else fit_fid_on_gflops(ok)
    figures = []
    if not refused and any(r["fid"] is not None for r in ok):
        title = "FID vs model Gflops"
        if fit:
            title += f": slope {fit['slope']}, Spearman {fit['spearman']} (n={fit['n']})"
        plot_fid_vs(ok, "gflops", "model Gflops per forward pass (log)", out / "fid_vs_gflops.png", title,
                    connect=False, fit=fit)
        plot_fid_vs(ok, "steps", "training steps (log)", out / "fid_vs_steps.png",
                    "FID vs training steps, one line per config", connect=True)
        plot_fid_vs(ok, "train_compute", "training compute, Gflops (Gflops x 3 x batch x steps; log)",
                    out / "fid_vs_compute.png", "FID vs training compute", connect=True)
        figures += ["fid_vs_gflops.png", "fid_vs_steps.png", "fid_vs_compute.png"]
        if plot_curves(ok, "curve_steps", "step", "training step (log)", out / "fid_over_training.png",
                       "FID over training, from each run's kept EMAs"):
            figures.append("fid_over_training.png")
        if plot_curves(ok, "curve_sampling", "sample_gflops_per_image",
                       "sampling Gflops per image (model Gflops x steps x 2 with guidance; log)",
                       out / "fid_vs_sampling_compute.png", "FID vs sampling compute (Figure 10)"):
            figures.append("fid_vs_sampling_compute.png")
    for stale in ("fid_vs_gflops.png", "fid_vs_steps.png", "fid_vs_compute.png", "fid_over_training.png",
                  "fid_vs_sampling_compute.png"):
        if stale not in figures:  # a refused report must not leave an older, incomparable figure
            (out / stale).unlink(missing_ok=True)
    grid = samples_grid(rows, out / "samples_grid.png")
    if grid.pop("written"):
        figures.append("samples_grid.png")
    else:
        (out / "samples_grid.png").unlink(missing_ok=True)
    doc = {
        "experiments": rows,
        "missing": [{"name": r["name"], "reason": r["reason"]} for r in rows if r["status"] != "ok"],
        "fit_fid_on_gflops": fit,
        "comparable": not refused,
        "provenance_groups": groups,
        "figures": sorted(figures),
        "grid": grid,
    }
    write_json(out / "scaling.json", doc)
    write_tsv(out / "scaling.tsv", TABLE_COLUMNS, ok)  # dvc plots show artifacts/scaling/scaling.tsv -x gflops -y fid
    return doc, groups


def print_table(rows: list[dict]) -> None:
    cols = TABLE_COLUMNS
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    table = [cols] + [[fmt(r.get(c)) if r["status"] == "ok" or c == "name" else "" for c in cols]
                      + ([] if r["status"] == "ok" else [f"MISSING: {r['reason']}"]) for r in rows]
    widths = [max(len(t[i]) for t in table if i < len(t)) for i in range(len(cols))]
    for t in table:
        print("  ".join(c.ljust(widths[i]) if i < len(widths) else c for i, c in enumerate(t)).rstrip())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.scaling", description=__doc__.split("\n")[0])
    parser.add_argument("--exps", nargs="+", default=None, help="experiment names (default: all of HEAD)")
    parser.add_argument("--sweep", default=None,
                        help="a sweep (sweeps/<name>.yaml or a file): its configs, run or not, are the rows")
    parser.add_argument("--all-commits", action="store_true", help="experiments of every commit")
    parser.add_argument("--out", default=str(OUT), help=f"output folder (default {OUT})")
    args = parser.parse_args(argv)
    try:
        rows = gather(args.exps, args.sweep, args.all_commits)
        if not rows:
            fail("no experiments found (dvc exp show lists none); run a sweep first: python -m stages.sweep scaling")
        doc, groups = report(rows, Path(args.out))
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(rows)
    fit = doc["fit_fid_on_gflops"]
    if fit:
        print(f"FID vs Gflops (log-log, {fit['n']} experiments, {fit['gflops_span']}x in Gflops): "
              f"slope {fit['slope']}, Spearman {fit['spearman']}")
    for m in doc["missing"]:
        print(f"missing: {m['name']}: {m['reason']}")
    for s in doc["grid"]["skipped"]:
        print(f"samples grid: {s['name']} left out: {s['reason']}")
    print(f"scaling: {len(rows) - len(doc['missing'])} experiments, {len(doc['missing'])} missing -> "
          f"{args.out}/scaling.json, {', '.join(doc['figures']) or 'no figures'}")
    if not doc["comparable"]:
        names = "; ".join(f"reference {(g['reference_sha256'] or '?')[:12]} / inception "
                          f"{(g['inception_weights_sha256'] or '?')[:12]}: {', '.join(g['experiments'])}"
                          for g in groups)
        print(f"error: FID figures refused: the experiments' FIDs use different reference batches or "
              f"Inception weights and are not comparable ({names}); choose one group with --exps",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
