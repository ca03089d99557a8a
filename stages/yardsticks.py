"""yardsticks stage: the two numbers every FID needs beside it, on the same number of images as the samples.

- floor: N real images against the reference batch. Even real images score above 0 with few of them (the
  covariance of N feature vectors is a noisy estimate); no model can beat this at this N.
- rFID: the same N real images through the VAE (encode, posterior mean, decode) against the reference: what
  the autoencoder alone costs, the figure latent-diffusion papers report. A DiT's FID near its rFID
  measures the VAE, not the DiT.

N = `sample.num_samples` (capped at the images there are), chosen evenly spaced over the data index, so
the three FIDs (samples, reconstructions, reals) share one sample count and one reference. Held out from
the VAE's training only when the VAE was not trained here: the embedded default's VAE trains on every
image the data stage accepted (the manifest says `held_out: false`); a pretrained VAE (`vae.pretrained`,
e.g. SD's, trained on OpenImages) never saw them.

Writes artifacts/yardsticks/{yardsticks.json, manifest.json}; the evaluate stage copies the two FIDs into
metrics.json next to the samples' FID.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from stages.runtime.common import (Manifest, atomic_dir, fail, load_inception, load_params, main_guard,
                           read_manifest, require_path, scratch_dir, write_json)
from stages.runtime.images import BadImage, iter_images, read_index

DATA, VAE, REFERENCE = Path("artifacts/data"), Path("artifacts/vae"), Path("artifacts/reference")
OUT = Path("artifacts/yardsticks")
BATCH = 64  # VAE images per call: one compiled shape, the tail padded


def pick(n_items: int, count: int) -> np.ndarray:
    """`count` indices evenly spaced over 0..n_items-1 (all of them when count >= n_items)."""
    return np.unique(np.linspace(0, n_items - 1, min(count, n_items)).round().astype(int))


def real_images(index: dict, size: int, count: int, manifest: Manifest) -> tuple[np.ndarray, list[int]]:
    """(the picked real images, their positions in the data index); unreadable ones are skipped, listed."""
    images, positions = [], []  # only the picked images are read and decoded (50K of ImageNet's 1.28M)
    picked = sorted(pick(len(index["items"]), count).tolist())  # iter_images yields them in this order
    for position, (key, _, image) in zip(picked, iter_images(index, size, only=set(picked))):
        if isinstance(image, BadImage):
            manifest.skip(key, str(image))
        else:
            images.append(image)
            positions.append(position)
    if not images:
        fail("artifacts/data: no readable images for the yardsticks")
    return np.stack(images), positions


def reconstruct(images: np.ndarray) -> np.ndarray:
    """Encode to the posterior mean, decode, and round to uint8 as the sample stage does."""
    import jax
    import jax.numpy as jnp

    from dit import backend, vae as vae_lib

    try:
        config, params = vae_lib.load(VAE)
    except ValueError as e:
        fail(f"artifacts/vae: {e}")
    model = vae_lib.AutoencoderKL(config)

    @functools.partial(jax.jit, compiler_options=backend.conv_compiler_options())  # Eigen convs on CPU
    def recon(x_uint8):
        x = x_uint8.astype(jnp.float32) / 127.5 - 1.0  # as the encode stage feeds the VAE
        mean, _ = model.apply({"params": params}, x, method=vae_lib.AutoencoderKL.encode)
        y = model.apply({"params": params}, mean, method=vae_lib.AutoencoderKL.decode)
        return jnp.clip(127.5 * y + 128.0, 0, 255).astype(jnp.uint8)  # stages.sample.to_uint8

    out = []
    for start in range(0, len(images), BATCH):
        chunk = images[start:start + BATCH]
        pad = BATCH - len(chunk)
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(recon(chunk))[:BATCH - pad])
    return np.concatenate(out)


def main(argv: list[str]) -> None:
    params = load_params("yardsticks", argv, __doc__)
    size, count, ev = params["data"]["image_size"], params["sample"]["num_samples"], params["evaluate"]
    if not isinstance(count, int) or count < 2:
        fail(f"sample.num_samples: expected an integer >= 2, got {count!r}")
    require_path(DATA / "index.json", "artifacts/data")
    read_manifest(DATA)
    vae_manifest = read_manifest(VAE)
    read_manifest(REFERENCE)
    reference = REFERENCE / "reference.npz"

    from metrics.adm import evaluate
    from metrics.npz import write_atomic

    manifest = Manifest("yardsticks", params)
    inception = load_inception(ev, manifest)
    manifest.add_input("data", DATA / "index.json")
    manifest.add_input("vae", VAE, exclude=("manifest.json",))
    manifest.add_input("reference", reference)
    index = read_index(DATA)
    reals, positions = real_images(index, size, count, manifest)
    recons = reconstruct(reals)
    # the floor's images are reference images: their features were computed by the reference stage
    from metrics.adm import reference_features

    known = {"floor": reference_features(reference, positions), "rfid": None}
    pretrained = (vae_manifest.get("params", {}).get("vae", {}) or {}).get("pretrained")
    held_out = {"held_out": bool(pretrained),
                "why": "a pretrained VAE, not trained on these images" if pretrained else
                       "the VAE stage trains on every image the data stage accepted (no held-out split)"}
    results = {}
    with scratch_dir(OUT) as tmp:  # the real images and their reconstructions, as npz for the ADM suite
        for name, images in (("floor", reals), ("rfid", recons)):
            path = Path(tmp) / f"{name}.npz"
            write_atomic(path, {"arr_0": images})
            try:
                # eigh: the same FID as ADM's sqrtm to ~1e-7 relative; N < 2048 images: an N x N problem
                results[name] = evaluate(str(reference), str(path), inception, batch_size=ev["batch_size"],
                                         fid_method="eigh", sample_features=known[name])
            except ValueError as e:
                fail(str(e))
    mse = float(np.mean(((reals.astype(np.float64) - recons) / 255.0) ** 2))
    doc = {"num_images": int(len(reals)), "floor": results["floor"], "rfid": results["rfid"],
           "fid_method": "eigh", "floor_features": "from the reference" if known["floor"] else "computed",
           "recon_psnr_db": round(float(10 * np.log10(1.0 / max(mse, 1e-12))), 4), **held_out,
           "inception": {"source": inception.source, "weights_sha256": inception.weights_sha256},
           "reference_sha256": manifest.inputs["reference"]}
    with atomic_dir(OUT) as tmp:
        write_json(tmp / "yardsticks.json", doc)
        manifest.counts = {"total": len(pick(len(index["items"]), count)), "processed": int(len(reals)),
                           "skipped": len(manifest.skipped)}
        manifest.write(tmp)
    print(f"yardsticks: {len(reals)} images: real-vs-real FID {results['floor']['fid']:.3f}, "
          f"rFID {results['rfid']['fid']:.3f} (recon PSNR {doc['recon_psnr_db']:.2f} dB) -> {OUT}")


if __name__ == "__main__":
    main_guard(main)
