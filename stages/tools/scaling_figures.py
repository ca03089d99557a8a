"""The scaling report's figures: FID against Gflops, steps, compute and sampling compute, and the
grid of the same sample index across configs. PNGs carry no software or date stamp, so the same data
gives the same bytes."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

SAMPLES = "artifacts/samples/samples.npz"
GRID_COLUMNS = 10  # sample indices 0..9: one per class under `sample.labels: balanced` on digits
PNG_META = {"Software": None}  # no version stamp: the same data gives the same bytes


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "dit", "font.size": 9})
    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, metadata=PNG_META)
    os.replace(tmp, path)


def _finish(plt, fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """Log-log axes, labels, legend and grid; then write the PNG and free the figure."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="best")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _yardstick_lines(ax, rows: list[dict]) -> None:
    for key, label, style in (("rfid", "rFID (VAE reconstructions)", "--"),
                              ("fid_floor", "real vs real (floor)", ":")):
        vals = sorted({r[key] for r in rows if r.get(key) is not None})
        if vals:
            ax.axhline(vals[0], color="gray", linestyle=style, linewidth=1,
                       label=label + ("" if len(vals) == 1 else f" (min of {len(vals)})"))


def plot_fid_vs(rows: list[dict], x: str, xlabel: str, path: Path, title: str, connect: bool,
                fit: dict | None = None) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    by_config: dict[str, list[dict]] = {}
    for r in rows:
        if r.get(x) and r["fid"]:
            by_config.setdefault(r["config"], []).append(r)
    for config in sorted(by_config):
        pts = sorted(by_config[config], key=lambda r: r[x])
        ax.plot([r[x] for r in pts], [r["fid"] for r in pts], "o-" if connect else "o", label=config)
        if not connect:
            for r in pts:
                ax.annotate(r["name"], (r[x], r["fid"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    if fit and fit["slope"] is not None:
        xs = sorted(r[x] for r in rows if r.get(x) and r["fid"])
        xs = np.array([xs[0], xs[-1]])
        ax.plot(xs, 10 ** (fit["intercept"] + fit["slope"] * np.log10(xs)), "k-", linewidth=0.8,
                label=f"fit: FID ~ Gflops^{fit['slope']}")
    _yardstick_lines(ax, rows)
    _finish(plt, fig, ax, xlabel, "FID (lower is better)", title, path)


def read_samples(rev: str, count: int) -> np.ndarray:
    """The first `count` samples of an experiment's samples.npz, from the DVC cache."""
    import dvc.api

    with dvc.api.open(SAMPLES, rev=rev, mode="rb") as f:
        data = io.BytesIO(f.read())
    with np.load(data, allow_pickle=False) as z:
        return z["arr_0"][:count]


def samples_grid(rows: list[dict], path: Path) -> dict:
    """Rows = experiments (by Gflops), columns = sample indices 0..9: the same noise and label in each
    column, as the paper's Figure 7."""
    from PIL import Image, ImageDraw

    got, skipped = [], []
    for r in sorted((r for r in rows if r["status"] == "ok"), key=lambda r: (r["gflops"] or 0, r["name"])):
        try:
            got.append((r["name"], read_samples(r["rev"], GRID_COLUMNS)))
        except Exception as e:  # not in the cache (pulled elsewhere, gc'd): name it, draw the rest
            skipped.append({"name": r["name"], "reason": f"{type(e).__name__}: {str(e)[:200]}"})
    if not got:
        return {"experiments": [], "skipped": skipped, "written": False}
    h, w = got[0][1].shape[1:3]
    scale = max(1, 64 // h)
    label_w, cols = 130, max(len(s) for _, s in got)
    canvas = Image.new("RGB", (label_w + cols * w * scale, len(got) * h * scale), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, s) in enumerate(got):
        for j, img in enumerate(s):
            tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + j * w * scale, i * h * scale))
        draw.text((4, i * h * scale + 4), name, fill="black")
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)
    return {"experiments": [n for n, _ in got], "skipped": skipped, "written": True}


def plot_curves(rows: list[dict], key: str, x: str, xlabel: str, path: Path, title: str) -> bool:
    """One line per experiment from its curves stage (`key`: curve_steps or curve_sampling); False when
    no experiment has that curve."""
    have = [r for r in rows if r.get(key)]
    if not have:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for r in sorted(have, key=lambda r: (r["gflops"] or 0, r["name"])):
        pts = sorted(r[key], key=lambda p: p[x])
        ax.plot([p[x] for p in pts], [p["fid"] for p in pts], "o-", label=f"{r['name']} ({r['config']})")
        if key == "curve_sampling":
            for p in pts:
                ax.annotate(p["sampler"], (p[x], p["fid"]), fontsize=5, xytext=(2, 2), textcoords="offset points")
    _finish(plt, fig, ax, xlabel, f"FID, {have[0].get('curve_samples')} samples (lower is better)", title, path)
    return True
