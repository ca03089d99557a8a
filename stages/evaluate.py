"""evaluate stage: ADM's FID, sFID, IS, precision and recall of the samples against the reference, with
the provenance that ties the numbers to the exact samples, reference, weights, checkpoint and code."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from stages.runtime import environment
from stages.runtime.common import (Manifest, check_inception_batch, code_version, fail, load_inception, load_params,
                           main_guard, read_manifest, write_json)

SAMPLES, REFERENCE, OUT = Path("artifacts/samples"), Path("artifacts/reference"), Path("artifacts/eval")
YARDSTICKS = Path("artifacts/yardsticks/yardsticks.json")  # absent in pipelines without that stage
UPSTREAM = ("data", "vae", "encode", "train", "pretrained", "sample", "reference")


def dvc_lock_hashes(lock: Path = Path("dvc.lock")) -> dict:
    """md5 of every out of each upstream stage as dvc.lock records it (absent before the first repro)."""
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {name: {o["path"]: o.get("md5") for o in stages[name].get("outs", [])}
            for name in UPSTREAM if name in stages}


def main(argv: list[str]) -> None:
    params = load_params("evaluate", argv, __doc__)
    cfg = params["evaluate"]
    method = cfg.get("fid_method", "sqrtm")
    if method not in ("sqrtm", "eigh"):
        fail(f"evaluate.fid_method: {method!r}; use sqrtm (ADM's) or eigh (the same FID to ~1e-7, faster)")
    check_inception_batch(cfg)  # before the upstream artifacts are read
    manifest = Manifest("evaluate", params)
    sample_manifest = read_manifest(SAMPLES)
    read_manifest(REFERENCE)
    samples, reference = SAMPLES / "samples.npz", REFERENCE / "reference.npz"

    from metrics.adm import evaluate

    inception = load_inception(cfg, manifest)

    t0 = time.time()
    try:
        metrics = evaluate(str(reference), str(samples), inception, batch_size=cfg["batch_size"],
                           fid_method=method)
    except (ValueError, FileNotFoundError) as e:  # MetricsInputError; an npz gone from beside its manifest
        fail(str(e))
    manifest.add_input("samples", samples)
    manifest.add_input("reference", reference)
    provenance = {
        "samples_sha256": manifest.inputs["samples"],
        "reference_sha256": manifest.inputs["reference"],
        "inception": {"source": inception.source, "weights_sha256": inception.weights_sha256},
        "fid_method": method,
        "checkpoint_step": sample_manifest["checkpoint_step"],
        "ema_sha256": sample_manifest["ema_sha256"],
        "sampler": sample_manifest["sampler"],
        "num_samples": sample_manifest["counts"]["samples"],
        "dvc_lock": dvc_lock_hashes(),
        "code": code_version(),
        "environment": environment.record(),  # after Inception ran, so JAX's devices are in it
    }
    doc = {"metrics": metrics, "cost": sample_manifest.get("cost"), "provenance": provenance}
    if YARDSTICKS.is_file():
        import json

        yard = json.loads(YARDSTICKS.read_text())
        if (yard.get("reference_sha256") != provenance["reference_sha256"]
                or yard.get("inception") != provenance["inception"]):
            fail(f"{YARDSTICKS}: made with another reference batch or Inception network than these "
                 "samples' FID; rerun the yardsticks stage (dvc repro yardsticks)")
        # next to fid, so `dvc exp show` has them as columns: what reals score (the floor) and what the
        # VAE alone scores (rFID), on the same number of images
        metrics.update(fid_floor=yard["floor"]["fid"], rfid=yard["rfid"]["fid"])
        doc["yardsticks"] = yard
        manifest.add_input("yardsticks", YARDSTICKS)
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / "metrics.json", doc)
    manifest.counts = {"samples": provenance["num_samples"]}
    manifest.extra["eval_s"] = round(time.time() - t0, 3)
    manifest.write(OUT)
    print("evaluate: " + ", ".join(f"{k}={v}" for k, v in metrics.items()) + f" -> {OUT}/metrics.json")


if __name__ == "__main__":
    main_guard(main)
