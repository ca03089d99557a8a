"""curves stage: FID over training and FID over sampling compute, from one run's checkpoints.

- FID vs training step: every EMA the trainer kept (`train.keep_every`; the final step's always counts)
  sampled with `curves.train_sampler`.
- FID vs sampling compute (the paper's Figure 10): the final EMA sampled with each of `curves.samplers`
  ("dpm++10", "50", ...), each point's x the sampling Gflops per image (model Gflops x steps x 2 with
  guidance).

Every point uses `curves.num_samples` samples drawn as the sample stage draws them (labels, noise and
guidance from `seed` and `sample.*`), so points differ only in the weights or the sampler, and the same
reference and Inception weights as the evaluate stage. FID at a small N sits above FID at the evaluate
stage's N (the floor rises as N falls): compare points of one curve, or curves of one N.

A short stage (about 2 minutes on the embedded default): a killed run is redone whole. One process.

Writes artifacts/curves/{fid_vs_step.tsv, fid_vs_sampling.tsv} (kept in git for `dvc plots`) and
artifacts/curves/{curves.json, manifest.json}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from stages.runtime.common import (Manifest, fail, is_int, load_inception, load_params, main_guard, read_manifest,
                           scratch_dir, tree_sha256, write_json, write_tsv)

CKPT, VAE, REFERENCE = Path("artifacts/checkpoints"), Path("artifacts/vae"), Path("artifacts/reference")
OUT = Path("artifacts/curves")
COLUMNS = ("fid", "sfid", "precision", "recall")


def check_params(cfg: dict) -> None:
    n = cfg["num_samples"]
    if not is_int(n, 2):
        fail(f"curves.num_samples: expected an integer >= 2, got {n!r}")
    if not isinstance(cfg["train_sampler"], (str, int)):
        fail(f"curves.train_sampler: expected a sampler name such as 'dpm++25', got {cfg['train_sampler']!r}")
    samplers = cfg["samplers"]
    if not isinstance(samplers, list) or not all(isinstance(s, (str, int)) for s in samplers):
        fail(f"curves.samplers: expected a list of sampler names such as ['dpm++10', '50'], got {samplers!r}")
    # names before any artifact is read: a bad one fails at once (learn_sigma does not change the parsing)
    make_diffusion(str(cfg["train_sampler"]), False, "curves.train_sampler")
    for s in samplers:
        make_diffusion(str(s), False, "curves.samplers")


def make_diffusion(spacing: str, learn_sigma: bool, param: str):
    from dit.diffusion import create_diffusion

    try:
        return create_diffusion(timestep_respacing=spacing, learn_sigma=learn_sigma)
    except (ValueError, KeyError) as e:
        fail(f"{param}: {spacing!r} is not a sampler (N DDPM steps, 'ddimN' or 'dpm++N'): {e}")


def generate(sampler, ema, vae_params, root, sample_cfg, n: int, per_device: int, mesh, num_classes: int):
    """n uint8 images and labels, samples 0..n-1 exactly as the sample stage draws them."""
    from dit.sharding import batch_sharding
    from stages.runtime.sampler import run_sampler

    shard, step = batch_sharding(mesh), mesh.size * per_device
    images, labels = [], []
    for start in range(0, n, step):
        idx = np.arange(start, start + step)  # past n: padding, thrown away
        out, y = run_sampler(sampler, ema, vae_params, root, sample_cfg, idx, shard, num_classes)
        images.append(np.asarray(out))
        labels.append(y)
    return np.concatenate(images)[:n], np.concatenate(labels)[:n]


def score(images, labels, inception, batch_size: int, tmp: Path) -> dict:
    from metrics.adm import evaluate
    from metrics.npz import write_atomic

    path = tmp / "points.npz"
    write_atomic(path, {"arr_0": images, "arr_1": labels})
    try:
        m = evaluate(str(REFERENCE / "reference.npz"), str(path), inception, batch_size=batch_size,
                     fid_method="eigh")
    except ValueError as e:
        fail(str(e))
    return {k: round(float(m[k]), 6) for k in COLUMNS}


def write_off(params: dict) -> None:
    """curves.enabled: false (the embedded default's `make repro`): the stage's outputs, with no points, at
    once, so DVC has them and `dvc repro` reruns nothing; a sweep or `-S curves.enabled=true` draws them."""
    manifest = Manifest("curves", params)
    OUT.mkdir(parents=True, exist_ok=True)
    write_tsv(OUT / "fid_vs_step.tsv", ("step", "train_gflops", *COLUMNS), [])
    write_tsv(OUT / "fid_vs_sampling.tsv", ("sampler", "sampling_steps", "sample_gflops_per_image", *COLUMNS), [])
    write_json(OUT / "curves.json", {"enabled": False, "points": []})
    manifest.counts = {"points": 0, "checkpoints": 0, "skipped": 0}
    manifest.write(OUT)
    print(f"curves: off (curves.enabled: false) -> {OUT}; turn it on with -S curves.enabled=true")


def main(argv: list[str]) -> None:
    params = load_params("curves", argv, __doc__)
    cfg, sample_cfg = params["curves"], params["sample"]
    if not isinstance(cfg["enabled"], bool):
        fail(f"curves.enabled: expected true or false, got {cfg['enabled']!r}")
    check_params(cfg)
    if not cfg["enabled"]:
        return write_off(params)
    ckpt_manifest = read_manifest(CKPT)
    read_manifest(VAE)
    read_manifest(REFERENCE)
    info = json.loads((CKPT / "model.json").read_text())

    import jax
    from tqdm import tqdm

    from dit import vae as vae_lib
    from dit.models import DiT, DiTConfig
    from dit.sharding import make_mesh
    from stages.runtime import checkpoint
    from stages.runtime.sampler import build_sampler, check_params as check_sample, chunk_program, cost

    check_sample(sample_cfg)
    config = DiTConfig(**info["dit"])
    check_sample(sample_cfg, config.num_classes)
    train_spacing = str(cfg["train_sampler"])
    spacings = [str(s) for s in cfg["samplers"]]
    diffusions = {train_spacing: make_diffusion(train_spacing, config.learn_sigma, "curves.train_sampler")}
    for s in spacings:
        diffusions.setdefault(s, make_diffusion(s, config.learn_sigma, "curves.samplers"))
    final = int(ckpt_manifest["final_step"])
    kept = checkpoint.kept_manager(CKPT).all_steps() if (CKPT / "kept").is_dir() else []
    points = [(s, train_spacing) for s in sorted(set(kept) | {final})]
    points += [(final, s) for s in spacings if s != train_spacing]

    mesh = make_mesh(-1, 1)
    try:
        vae_config, vae_params = vae_lib.load(str(VAE))
    except ValueError as e:  # missing weights, NaN or Inf in a parameter
        fail(f"{VAE}: {e}")
    vae = vae_lib.AutoencoderKL(vae_config)
    model, scale, h = DiT(config), float(info["scaling_factor"]), config.input_size
    root = jax.random.fold_in(jax.random.key(params["seed"]), sample_cfg["seed"])
    manifest = Manifest("curves", params)
    inception = load_inception(params["evaluate"], manifest)
    manifest.add_input("checkpoints", CKPT)
    manifest.add_input("vae", VAE, exclude=("manifest.json",))
    manifest.add_input("reference", REFERENCE / "reference.npz")
    guided = sample_cfg["cfg_scale"] > 1.0

    samplers, results = {}, []
    emas = {final: checkpoint.final_ema(CKPT, ckpt_manifest, config, mesh)[1]}  # never another step in its place
    for step in sorted(set(kept) - {final}):  # a damaged kept EMA is left out of the curve, and listed
        try:
            emas[step] = checkpoint.restore_ema(checkpoint.kept_manager(CKPT), step, config, mesh)
        except Exception as e:  # integrity.Damaged, or a read that fails
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            manifest.skip(f"{CKPT}/kept/{step}", f"does not restore ({type(e).__name__}: {reason})")
            print(f"curves: {CKPT}/kept/{step} does not restore ({reason}); left out of the curve", flush=True)
    points = [(s, sp) for s, sp in points if s in emas]
    t0 = time.time()
    bar = tqdm(total=len(points), unit="point", desc="curves", mininterval=2.0)
    with scratch_dir(OUT) as tmp:  # each point's samples, as npz for the ADM suite
        for step, spacing in points:
            if spacing not in samplers:
                samplers[spacing] = build_sampler(chunk_program(model, vae, diffusions[spacing], sample_cfg, scale,
                                                                (h, h, config.in_channels)), mesh)
            images, labels = generate(samplers[spacing], emas[step], vae_params, root, sample_cfg,
                                      cfg["num_samples"], sample_cfg["batch_size"], mesh, config.num_classes)
            d = diffusions[spacing]
            c = cost(config, {"params": ckpt_manifest.get("params", {}), "final_step": step},
                     d.num_timesteps, guided)
            results.append({"step": step, "sampler": spacing, "kind": d.sampler_kind,
                            "sampling_steps": d.num_timesteps, "ema_sha256": tree_sha256(emas[step]),
                            "train_gflops": c["train_gflops"],
                            "sample_gflops_per_image": c["sample_gflops_per_image"],
                            **score(images, labels, inception, params["evaluate"]["batch_size"], Path(tmp))})
            bar.set_postfix(step=step, sampler=spacing, fid=f"{results[-1]['fid']:.2f}")
            bar.update()
    bar.close()

    by_step = [r for r in results if r["sampler"] == train_spacing]
    by_sampler = sorted((r for r in results if r["step"] == final), key=lambda r: r["sample_gflops_per_image"])
    OUT.mkdir(parents=True, exist_ok=True)
    write_tsv(OUT / "fid_vs_step.tsv", ("step", "train_gflops", *COLUMNS), by_step)
    write_tsv(OUT / "fid_vs_sampling.tsv",
              ("sampler", "sampling_steps", "sample_gflops_per_image", *COLUMNS), by_sampler)
    write_json(OUT / "curves.json", {
        "enabled": True, "num_samples": cfg["num_samples"], "train_sampler": train_spacing, "final_step": final,
        # the model's cost; each point carries its own sampling Gflops
        "cost": {k: v for k, v in cost(config, ckpt_manifest, 0, guided).items() if k != "sample_gflops_per_image"},
        "points": results,
        "reference_sha256": manifest.inputs["reference"],
        "inception": {"source": inception.source, "weights_sha256": inception.weights_sha256}})
    manifest.counts = {"points": len(results), "checkpoints": len(emas), "skipped": len(manifest.skipped)}
    manifest.extra["curves_s"] = round(time.time() - t0, 3)
    manifest.write(OUT)
    print(f"curves: {len(by_step)} training points, {len(by_sampler)} sampler points "
          f"({time.time() - t0:.1f}s) -> {OUT}")


if __name__ == "__main__":
    main_guard(main)
