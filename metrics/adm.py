"""ADM's evaluation suite (openai/guided-diffusion `evaluations/evaluator.py`): IS, FID, sFID, precision,
recall, on Inception features from `metrics.inception`, with ADM's batch formats.

Run as `python -m metrics.adm REF.npz SAMPLE.npz [--json OUT]`; it prints what ADM's evaluator prints.

Where this differs from ADM, on purpose:
- pairwise distances for precision/recall are float32 throughout. ADM first tries float16 (a speed trick
  whose rounding depends on the TF kernel) and falls back to float32 only when float16 overflows.
- statistics are float64 (ADM's mean is float32, its covariance float64).
- the reference's precomputed `mu`/`sigma` are checked (shape, finiteness, feature source) before use.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from metrics import npz
from metrics.errors import MetricsInputError

META_KEY = "metrics_meta"  # uint8 JSON bytes: no pickle, and ADM's reader ignores unknown keys
META_FORMAT = "dit-metrics-reference/1"
REF_POOL_KEY = "arr_0_pool_3"  # pool_3 features of arr_0, so evaluate need not recompute them
REF_SPATIAL_KEY = "arr_0_spatial"  # and their spatial features, so the yardsticks' floor need not either
REF_INDEX_KEY = "arr_0_index"  # each arr_0 image's position in the data index
BLOCK = 10_000  # ADM's row and column batch sizes for the distance blocks
POOL_DIM, SPATIAL_DIM = 2048, 2023


# ---------------------------------------------------------------------------------------------- FID


def _finite_2d(features, what: str, dtype=np.float64) -> np.ndarray:
    f = np.asarray(features)
    if f.dtype == object or not np.issubdtype(f.dtype, np.number):
        raise MetricsInputError(f"{what}: dtype {f.dtype}; expected numeric features")
    if f.ndim != 2 or len(f) < 2:
        raise MetricsInputError(f"{what}: shape {f.shape}; expected (N >= 2, D) features")
    f = f.astype(dtype, copy=False)
    if not np.isfinite(f).all():
        raise MetricsInputError(f"{what}: contains NaN or inf")
    return f


def statistics(features, what: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) in float64, covariance with N - 1 as ADM's np.cov."""
    f = _finite_2d(features, what)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _check_stats(mu, sigma, what: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.atleast_1d(np.asarray(mu, np.float64)), np.atleast_2d(np.asarray(sigma, np.float64))
    d = dim if dim is not None else mu.shape[0]
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise MetricsInputError(f"{what}: mu {mu.shape} / sigma {sigma.shape}; expected ({d},) / ({d}, {d})")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise MetricsInputError(f"{what}: statistics contain NaN or inf")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm",
                     factor1: np.ndarray | None = None) -> float:
    """ADM's (= TTUR's) Frechet distance.

    method="sqrtm" (ADM): scipy.linalg.sqrtm of sigma1 @ sigma2, retried with eps * I added to both when
    not finite; an imaginary diagonal above 1e-3 is an error, smaller imaginary parts are dropped.
    method="eigh": tr sqrt(sigma1 sigma2) as the sum of sqrt(eig(sqrt(sigma1) sigma2 sqrt(sigma1))), two
    symmetric eigendecompositions: the same number for covariance matrices (PSD; 2e-7 relative apart on
    a real 2048-d case), never complex, and up to ~6x faster at 2048 dims with full-rank covariances
    (13 s vs 78 s for sqrtm's complex Schur form on the 2-core development machine).
    `factor1` (eigh only): F with sigma1 = F^T F, the centred features over sqrt(N - 1) (`factor`). With
    fewer rows than dimensions (a few hundred samples against 2048 features: the curves and yardsticks
    stages) sigma1 sigma2 has the nonzero eigenvalues of F sigma2 F^T, so tr sqrt is an N x N eigenvalue
    problem instead of two D x D eigendecompositions (milliseconds instead of ~2 s). Both eigh forms set the
    eigenvalues within rounding of zero to 0 (`psd_clip`), so no rounding noise from a null space enters
    the square roots: on 500 x 2048 features both match the nuclear norm of F1 F2^T to ~1e-15 on any CPU,
    where sqrtm is ~4e-8 off.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "statistics 1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "statistics 2", dim=mu1.shape[0])
    diff = mu1 - mu2
    if method == "sqrtm":
        tr_covmean = _trace_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_eigh(sigma1, sigma2, factor1)
    else:
        raise MetricsInputError(f"unknown FID method '{method}': use 'sqrtm' (ADM) or 'eigh'")
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _trace_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # product might be almost singular
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov "
                      "estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error might give a slight imaginary component
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_eigh(sigma1: np.ndarray, sigma2: np.ndarray, factor1: np.ndarray | None = None) -> float:
    dim = len(sigma2)
    if factor1 is not None and factor1.shape[0] < factor1.shape[1]:
        m = factor1 @ sigma2 @ factor1.T  # (N, N): the nonzero spectrum of sigma1 sigma2
    else:
        w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
        root1 = (v * np.sqrt(psd_clip(w, dim))) @ v.T
        m = root1 @ sigma2 @ root1
    return float(np.sqrt(psd_clip(np.linalg.eigvalsh((m + m.T) / 2), dim)).sum())


def psd_clip(w: np.ndarray, dim: int) -> np.ndarray:
    """Eigenvalues `w` of a positive semi-definite matrix formed from `dim`-dimensional features, with those
    within rounding of zero set to 0, as exact arithmetic has them.

    An exact zero eigenvalue (centring leaves one; fewer samples than dimensions leave many) comes back from
    forming the matrix and from LAPACK as +-1e-16 ||m|| or so, positive with one CPU's kernels and negative
    with another's. A square root turns that into ~1e-8 sqrt(||m||), the only part of tr sqrt that would
    depend on the machine (1e-9 of a FID on a Zen 3). Values below dim * eps * max|w| (np.linalg.matrix_rank's
    tolerance) are therefore 0; a true eigenvalue that small would add at most its square root, as the
    rounding did."""
    tol = max(dim, len(w)) * np.finfo(w.dtype).eps * (np.abs(w).max() if w.size else 0.0)
    return np.where(w > tol, w, 0.0)


def factor(features, what: str = "features") -> np.ndarray:
    """F = (features - mean) / sqrt(N - 1), float64: `statistics`' covariance is F^T F."""
    f = _finite_2d(features, what)
    return (f - f.mean(axis=0)) / np.sqrt(len(f) - 1)


def _fid_of(features, ref_stats, what: str, method: str) -> float:
    """FID of sample features against the reference's (mu, sigma); eigh gets the features' factor where it
    is used, with fewer samples than dimensions (not built for 50,000 x 2048 only to be dropped)."""
    mu, sigma = statistics(features, what)
    small = method == "eigh" and len(features) < len(mu)
    return frechet_distance(mu, sigma, *ref_stats, method=method, factor1=factor(features, what) if small else None)


# ---------------------------------------------------------------------------------------------- IS


def inception_score(logits, split_size: int = 5000) -> float:
    """exp(E[KL(p(y|x) || p(y))]) per contiguous split of `split_size`, averaged over splits (ADM)."""
    z = _finite_2d(logits, "logits")
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for start in range(0, len(log_p), split_size):
        lp = log_p[start:start + split_size]
        p = np.exp(lp)
        kl = p * (lp - np.log(p.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


# ---------------------------------------------------------------------------------------------- P/R


@jax.jit
def _sq_distances(u: jax.Array, v: jax.Array) -> jax.Array:
    """ADM's squared euclidean distances: max(|u|^2 - 2 u.v + |v|^2, 0), float32."""
    nu = jnp.sum(jnp.square(u), axis=1)[:, None]
    nv = jnp.sum(jnp.square(v), axis=1)[None, :]
    return jnp.maximum(nu - 2 * jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST) + nv, 0.0)


@partial(jax.jit, static_argnames="k")
def _smallest_update(best: jax.Array, u: jax.Array, v: jax.Array, k: int) -> jax.Array:
    """Keep the k + 1 smallest distances per row of u seen so far (self included, as ADM counts it)."""
    d = jnp.concatenate([best, _sq_distances(u, v)], axis=1)
    return -jax.lax.top_k(-d, k + 1)[0]


@jax.jit
def _in_balls(u, radii_u, v, radii_v) -> tuple[jax.Array, jax.Array]:
    """(u inside some v-ball, v inside some u-ball), ADM's `<=` on float32 distances."""
    d = _sq_distances(u, v)
    return jnp.any(d <= radii_v[None, :], axis=1), jnp.any(d <= radii_u[:, None], axis=0)


def manifold_radii(features: np.ndarray, k: int = 3, block: int = BLOCK) -> np.ndarray:
    """Squared distance to the k-th nearest neighbour, not counting the point itself (ADM takes index k
    of the sorted row, whose index 0 is the point's own zero distance; duplicates count as neighbours)."""
    feats = np.asarray(features, np.float32)
    radii = []
    for r in range(0, len(feats), block):
        rows = jnp.asarray(feats[r:r + block])
        best = jnp.full((len(rows), k + 1), jnp.inf, jnp.float32)
        for c in range(0, len(feats), block):
            best = _smallest_update(best, rows, jnp.asarray(feats[c:c + block]), k)
        radii.append(np.asarray(best[:, k]))
    return np.concatenate(radii)


def precision_recall(ref_pool, sample_pool, k: int = 3, block: int = BLOCK) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al.) as ADM's ManifoldEstimator: precision = fraction
    of samples inside some reference k-NN ball, recall = fraction of references inside some sample ball."""
    ref = _finite_2d(ref_pool, "reference features", np.float32)
    smp = _finite_2d(sample_pool, "sample features", np.float32)
    if ref.shape[1] != smp.shape[1]:
        raise MetricsInputError(f"feature dims differ: reference {ref.shape[1]}, samples {smp.shape[1]}")
    if min(len(ref), len(smp)) <= k:
        raise MetricsInputError(f"precision/recall with k={k} needs more than {k} features per set, got "
                                f"{len(ref)} reference and {len(smp)} sample")
    r_ref, r_smp = manifold_radii(ref, k, block), manifold_radii(smp, k, block)
    ref_in = np.zeros(len(ref), bool)
    smp_in = np.zeros(len(smp), bool)
    for i in range(0, len(ref), block):
        for j in range(0, len(smp), block):
            a, b = _in_balls(ref[i:i + block], r_ref[i:i + block], smp[j:j + block], r_smp[j:j + block])
            ref_in[i:i + block] |= np.asarray(a)
            smp_in[j:j + block] |= np.asarray(b)
    return float(smp_in.mean()), float(ref_in.mean())


# ---------------------------------------------------------------------------------------------- batches


def _image_info(path, what: str) -> tuple[int, int, int]:
    """(N, H, W) of a batch's arr_0, from its header; uint8 NHWC RGB or a clear error."""
    shape, dtype = npz.array_info(path, "arr_0")
    if dtype != np.uint8:
        raise MetricsInputError(f"{path}: {what} arr_0 has dtype {dtype}; ADM batches are uint8 0..255")
    if len(shape) != 4 or shape[-1] != 3:
        raise MetricsInputError(f"{path}: {what} arr_0 has shape {shape}; expected (N, H, W, 3)")
    return shape[0], shape[1], shape[2]


def read_meta(path) -> dict | None:
    if META_KEY not in npz.keys(path):
        return None
    raw = npz.load(path, META_KEY)
    try:
        return json.loads(raw.astype(np.uint8).tobytes().decode())
    except (ValueError, UnicodeDecodeError):
        raise MetricsInputError(f"{path}: '{META_KEY}' is not JSON metadata") from None


def batch_features(path, inception, batch_size: int = 64) -> dict[str, np.ndarray | None]:
    """Inception features of a batch's arr_0, streamed from the file."""
    parts = [inception.features(x, batch_size=batch_size)
             for x in npz.iter_batches(path, "arr_0", batch_size * 16)]
    if not parts:
        raise MetricsInputError(f"{path}: arr_0 holds no images")
    return {k: None if parts[0][k] is None else np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _reference_stats(path, names: tuple[str, str], dim: int):
    mu, sigma = (npz.load(path, n) for n in names)
    return _check_stats(mu, sigma, f"{path}: {names[0]}/{names[1]}", dim=dim)


def check_adm_batch(path, image_size: int | None = None) -> dict:
    """Validate a given ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) before it is used:
    uint8 NHWC arr_0 (at `image_size` if given), no object arrays, finite statistics of the right size."""
    n, h, w = _image_info(path, "reference")
    if image_size is not None and (h, w) != (image_size, image_size):
        raise MetricsInputError(f"{path}: reference images are {h}x{w}, not data.image_size "
                                f"{image_size}x{image_size}")
    keys = set(npz.keys(path))
    for names, dim in ((("mu", "sigma"), POOL_DIM), (("mu_s", "sigma_s"), SPATIAL_DIM)):
        if set(names) <= keys:
            _reference_stats(path, names, dim)
    return {"images": n, "image_size": [h, w], "statistics": sorted(keys & {"mu", "sigma", "mu_s", "sigma_s"})}


def check_reference(ref_npz, sample_npz, inception) -> None:
    """Reject, before any work, a reference that cannot be compared with these samples."""
    _, rh, rw = _image_info(ref_npz, "reference")
    _, sh, sw = _image_info(sample_npz, "sample")
    if (rh, rw) != (sh, sw):
        raise MetricsInputError(f"{ref_npz}: reference images are {rh}x{rw} but samples in {sample_npz} "
                                f"are {sh}x{sw}; build the reference at the sample resolution")
    meta = read_meta(ref_npz)
    if meta is None:
        return  # an ADM reference batch: nothing recorded to check
    if meta.get("feature_id") != inception.feature_id:
        raise MetricsInputError(f"{ref_npz}: statistics were computed with features "
                                f"'{meta.get('feature_id')}', not this Inception's '{inception.feature_id}'; "
                                "rebuild the reference with the same Inception weights")
    if list(meta.get("image_size", [])) != [sh, sw]:
        raise MetricsInputError(f"{ref_npz}: reference statistics are for {meta.get('image_size')} images "
                                f"but samples are {sh}x{sw}")


def evaluate(ref_npz, sample_npz, inception, batch_size: int = 64,
             fid_method: str = "sqrtm", sample_features: dict | None = None) -> dict[str, float | None]:
    """ADM's five numbers for a sample batch against a reference batch. IS is None without logits.
    `fid_method`: see `frechet_distance` ("sqrtm" is ADM's; "eigh" gives the same number faster).
    `sample_features`: the sample batch's features when they are known already (the yardsticks stage's real
    images, whose features the reference stage computed), instead of running Inception on it again."""
    check_reference(ref_npz, sample_npz, inception)
    ref_keys = set(npz.keys(ref_npz))
    ref_pre = {"mu", "sigma", "mu_s", "sigma_s"} <= ref_keys
    if ref_pre:  # check them now, not after an hour of Inception
        ref_stats = _reference_stats(ref_npz, ("mu", "sigma"), POOL_DIM)
        ref_stats_s = _reference_stats(ref_npz, ("mu_s", "sigma_s"), SPATIAL_DIM)
    if REF_POOL_KEY in ref_keys and read_meta(ref_npz) is not None:
        # our reference stores pool_3 of its arr_0 (same network, checked by check_reference above):
        # precision/recall need nothing else from the reference images, so Inception need not rerun
        ref = {"pool_3": _finite_2d(npz.load(ref_npz, REF_POOL_KEY), f"{ref_npz}: {REF_POOL_KEY}",
                                    np.float32)}
        if ref["pool_3"].shape != (_image_info(ref_npz, "reference")[0], POOL_DIM):
            raise MetricsInputError(f"{ref_npz}: {REF_POOL_KEY} has shape {ref['pool_3'].shape}; "
                                    f"expected one {POOL_DIM}-d row per arr_0 image")
    else:
        ref = batch_features(ref_npz, inception, batch_size)
    if not ref_pre:
        ref_stats = statistics(ref["pool_3"], f"{ref_npz}: pool_3")
        ref_stats_s = statistics(ref["spatial"], f"{ref_npz}: spatial")
    smp = sample_features if sample_features is not None else batch_features(sample_npz, inception, batch_size)
    precision, recall = precision_recall(ref["pool_3"], smp["pool_3"])
    return {
        "inception_score": None if smp["logits"] is None else inception_score(smp["logits"]),
        "fid": _fid_of(smp["pool_3"], ref_stats, f"{sample_npz}: pool_3", fid_method),
        "sfid": _fid_of(smp["spatial"], ref_stats_s, f"{sample_npz}: spatial", fid_method),
        "precision": precision,
        "recall": recall,
    }


def write_reference(path, images: np.ndarray, features: dict, *, feature_id: str,
                    images_features: dict | None = None, images_index: np.ndarray | None = None) -> None:
    """An ADM reference batch: arr_0 (kept images) + mu/sigma (pool_3) + mu_s/sigma_s (spatial), computed
    from all `features` (which may cover more images than arr_0 keeps), + metadata naming the feature
    network (`InceptionV3.feature_id`) and the image size, so a mismatched reference is rejected.
    `images_features` ({pool_3, spatial} of the arr_0 images, in their order) and `images_index` (where each
    arr_0 image sits in the data index) let later stages take features of those images instead of
    recomputing them (ADM's reader ignores the extra keys)."""
    from metrics.inception import check_images

    images = check_images(images, f"{path}: images")
    if images.dtype != np.uint8:
        raise MetricsInputError(f"{path}: reference images must be uint8 (ADM's format), got {images.dtype}")
    mu, sigma = statistics(features["pool_3"], "pool_3 features")
    mu_s, sigma_s = statistics(features["spatial"], "spatial features")
    if mu.shape != (POOL_DIM,) or mu_s.shape != (SPATIAL_DIM,):
        raise MetricsInputError(f"features have dims {mu.shape[0]} / {mu_s.shape[0]}; expected Inception "
                                f"pool_3 ({POOL_DIM}) and spatial ({SPATIAL_DIM})")
    meta = {"format": META_FORMAT, "feature_id": feature_id, "image_size": list(images.shape[1:3]),
            "num_images": int(len(images)), "num_features": int(len(features["pool_3"]))}
    arrays = {"arr_0": images, "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s,
              META_KEY: np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    for key, name, dim in ((REF_POOL_KEY, "pool_3", POOL_DIM), (REF_SPATIAL_KEY, "spatial", SPATIAL_DIM)):
        if images_features is not None:  # features of the arr_0 images, in their order
            if np.shape(images_features[name]) != (len(images), dim):
                raise MetricsInputError(f"{path}: {name} of arr_0 has shape {np.shape(images_features[name])}; "
                                        f"expected ({len(images)}, {dim})")
            arrays[key] = np.asarray(images_features[name], np.float32)
    if images_index is not None:
        arrays[REF_INDEX_KEY] = np.asarray(images_index, np.int64)
    npz.write_atomic(path, arrays)


def reference_features(path, positions) -> dict | None:
    """{pool_3, spatial} of the images at data-index `positions`, read from a reference this project wrote
    (write_reference's images_features and images_index); None when it does not hold all of them."""
    keys = set(npz.keys(path))
    if not {REF_POOL_KEY, REF_SPATIAL_KEY, REF_INDEX_KEY} <= keys or read_meta(path) is None:
        return None
    where = {int(p): r for r, p in enumerate(npz.load(path, REF_INDEX_KEY))}
    if not all(int(p) in where for p in positions):
        return None
    rows = np.asarray([where[int(p)] for p in positions], np.int64)
    return {"pool_3": npz.load(path, REF_POOL_KEY)[rows], "spatial": npz.load(path, REF_SPATIAL_KEY)[rows],
            "logits": None}


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metrics.adm", description=__doc__.split("\n")[0])
    parser.add_argument("ref_batch", help="reference batch .npz (arr_0, optional mu/sigma/mu_s/sigma_s)")
    parser.add_argument("sample_batch", help="sample batch .npz (arr_0: N x H x W x 3 uint8)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--inception-source", default="torchscript", choices=["torchscript", "graphdef"])
    parser.add_argument("--inception-path", default=None, help="default_1.pt or classify_image_graph_def.pb")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--fid-method", default="sqrtm", choices=["sqrtm", "eigh"],
                        help="sqrtm: ADM's scipy sqrtm (slow at 2048 dims); eigh: same value, faster")
    args = parser.parse_args(argv)
    from metrics.inception import InceptionV3

    try:
        inception = InceptionV3.load(args.inception_source, args.inception_path)
        res = evaluate(args.ref_batch, args.sample_batch, inception, args.batch_size, args.fid_method)
    except (MetricsInputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    is_ = res["inception_score"]
    print("Inception Score:", "unavailable (no softmax layer in the Inception weights)" if is_ is None else is_)
    print("FID:", res["fid"])
    print("sFID:", res["sfid"])
    print("Precision:", res["precision"])
    print("Recall:", res["recall"])
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(res | {"inception": inception.feature_id}, indent=2) + "\n")
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
