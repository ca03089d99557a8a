"""ADM's metrics against independent float64 NumPy/SciPy computations, and its batch formats."""

import json

from pathlib import Path

import numpy as np
import pytest
from scipy import linalg, special
from scipy.spatial.distance import cdist

from metrics import adm
from metrics.errors import MetricsInputError
from dit.backend import conv_compiler_options
from metrics.inception import InceptionV3

BATCH = 2  # the same batch size as tests/test_inception.py: one network compilation


def rel(a, b) -> float:
    return abs(a - b) / abs(b)


def gaussian_features(seed, n=400, d=48, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


# ---------------------------------------------------------------------------------------------- independent


def fid_reference(a, b):
    """Frechet distance via eigenvalues: tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1)))."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def is_reference(logits, split):
    p = special.softmax(logits.astype(np.float64), axis=1)
    scores = [np.exp(special.rel_entr(q, q.mean(0, keepdims=True)).sum(1).mean())
              for q in np.array_split(p, range(split, len(p), split))]
    return float(np.mean(scores))


def pr_reference(ref, smp, k=3):
    """Whole-matrix float64 k-NN balls (self at index 0 of each sorted row), `<=` membership."""
    r_ref = np.sort(cdist(ref, ref, "sqeuclidean"), axis=1)[:, k]
    r_smp = np.sort(cdist(smp, smp, "sqeuclidean"), axis=1)[:, k]
    d = cdist(ref, smp, "sqeuclidean")
    return float((d <= r_ref[:, None]).any(0).mean()), float((d <= r_smp[None, :]).any(1).mean())


# ---------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_matches_independent_float64(method):
    a, b = gaussian_features(0), gaussian_features(1, shift=0.3)
    ours = adm.frechet_distance(*adm.statistics(a), *adm.statistics(b), method=method)
    assert rel(ours, fid_reference(a, b)) < 1e-6


def test_fid_eigh_with_fewer_samples_than_dims_solves_the_small_problem(monkeypatch):
    """N < D (the curves and yardsticks stages: hundreds of samples, 2048 features): eigh with the samples'
    factor is an N x N eigenvalue problem, and it gives ADM's sqrtm number."""
    a, b = gaussian_features(5, n=20), gaussian_features(6, shift=0.3)
    sa, sb = adm.statistics(a), adm.statistics(b)
    np.testing.assert_allclose(adm.factor(a).T @ adm.factor(a), sa[1], rtol=0, atol=1e-12)
    sqrtm, independent = adm.frechet_distance(*sa, *sb, method="sqrtm"), fid_reference(a, b)

    def no_eigh(m):
        raise AssertionError(f"a {m.shape} eigendecomposition")

    monkeypatch.setattr(adm.np.linalg, "eigh", no_eigh)
    low = adm.frechet_distance(*sa, *sb, method="eigh", factor1=adm.factor(a))
    assert rel(low, sqrtm) < 1e-6 and rel(low, independent) < 1e-6
    # both covariances rank-deficient: tr sqrt(S1 S2) is then the nuclear norm of F1 F2^T, an independent
    # form with no null space to round in (a zero singular value is not square-rooted)
    c = gaussian_features(7, n=30, shift=0.1)
    sc, fa, fc = adm.statistics(c), adm.factor(a), adm.factor(c)
    nuclear = (((sa[0] - sc[0]) ** 2).sum() + np.trace(sa[1]) + np.trace(sc[1])
               - 2 * np.linalg.svd(fa @ fc.T, compute_uv=False).sum())
    # How far apart the two forms may be on any CPU, from float64 rounding and the problem's conditioning.
    # Another CPU's kernels round the N x N problem m differently: model that as a symmetric nudge of norm
    # delta = N eps ||m|| (LAPACK's own error is ~eps ||m||). Each eigenvalue then moves by at most delta
    # (Weyl), a nonzero one's square root by delta / (2 sqrt(lambda - delta)), and FID holds -2 tr sqrt. The
    # exact zero that centring leaves is set to 0 by adm.psd_clip's tolerance (D eps ||m|| > delta), not
    # square-rooted: before, its +-1e-16 ||m|| came back positive on a Zen 3 and put 1e-9 on the FID. The
    # reference's singular values move by ~N eps sigma_max each, unamplified.
    m, eps = fa @ sc[1] @ fa.T, np.finfo(float).eps
    lam = np.linalg.eigvalsh(m)
    delta, tol = len(m) * eps * lam.max(), a.shape[1] * eps * lam.max()
    nonzero = lam[lam > tol]
    assert len(lam) - len(nonzero) == 1 and nonzero.min() > 1e6 * tol  # one exact zero, far from the rest
    sv = np.linalg.svd(fa @ fc.T, compute_uv=False)
    bound = (delta / np.sqrt(nonzero - delta)).sum() + 2 * len(sv) * len(sv) * eps * sv.max()
    assert bound < 1e-12 * nuclear  # a relative 1e-12 holds wherever float64 does
    assert abs(adm.frechet_distance(*sa, *sc, method="eigh", factor1=fa) - nuclear) <= bound
    real_eigvalsh, rng = np.linalg.eigvalsh, np.random.default_rng(0)

    def another_cpus_rounding(x):
        e = rng.uniform(-1, 1, x.shape)
        e = (e + e.T) / 2
        return real_eigvalsh(x + e * (delta / np.linalg.norm(e, 2)))

    monkeypatch.setattr(adm.np.linalg, "eigvalsh", another_cpus_rounding)
    for _ in range(8):
        assert abs(adm.frechet_distance(*sa, *sc, method="eigh", factor1=fa) - nuclear) <= bound
    monkeypatch.setattr(adm.np.linalg, "eigvalsh", real_eigvalsh)
    with pytest.raises(AssertionError, match="eigendecomposition"):  # as many samples as dims: the D x D path
        adm.frechet_distance(*sb, *sa, method="eigh", factor1=adm.factor(b))


def test_fid_of_a_batch_against_itself_is_zero():
    a = gaussian_features(2)
    assert abs(adm.frechet_distance(*adm.statistics(a), *adm.statistics(a))) < 1e-3


def test_fid_retries_with_offset_when_sqrtm_is_not_finite(monkeypatch):
    a, b = gaussian_features(3), gaussian_features(4, shift=0.1)
    calls = []
    real_sqrtm = linalg.sqrtm

    def flaky_sqrtm(m):  # the first product "is singular", as ADM's guard expects
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(adm.linalg, "sqrtm", flaky_sqrtm)
    with pytest.warns(UserWarning, match="adding 1e-06 to diagonal"):
        val = adm.frechet_distance(*adm.statistics(a), *adm.statistics(b))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(48)) @ (s2 + 1e-6 * np.eye(48)))
    assert rel(val, fid_reference(a, b)) < 1e-4


def test_fid_rejects_large_imaginary_diagonal(monkeypatch):
    monkeypatch.setattr(adm.linalg, "sqrtm", lambda m: np.eye(len(m)) * (1 + 0.1j))
    with pytest.raises(ValueError, match="Imaginary component"):
        adm.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))


def test_inception_score_matches_independent():
    logits = np.random.default_rng(4).normal(0, 3, (230, 1008)).astype(np.float32)
    for split in (50, 5000):  # 50: five contiguous splits, the last one short
        assert rel(adm.inception_score(logits, split_size=split), is_reference(logits, split)) < 1e-6


@pytest.mark.parametrize("block", [10_000, 37])
def test_precision_recall_matches_independent_exactly(block):
    ref, smp = gaussian_features(5, n=180, d=32), gaussian_features(6, n=150, d=32, shift=0.4)
    assert adm.precision_recall(ref, smp, k=3, block=block) == pr_reference(ref, smp)


def test_precision_recall_ties_and_duplicates():
    """Integer lattice features give exact float32 distances: `<=` at the radius counts as inside, and a
    duplicate counts as a neighbour (its zero distance is not the point's own)."""
    ref = np.array([[x, 0] for x in (0, 1, 2, 3, 4, 4, 9)], np.float32)
    smp = np.array([[x, 0] for x in (3, 12, 6, 20, 1)], np.float32)
    ours = adm.precision_recall(ref, smp, k=3, block=3)
    assert ours == pr_reference(ref.astype(np.float64), smp.astype(np.float64))
    np.testing.assert_array_equal(adm.manifold_radii(ref, 3, block=2), [9, 4, 4, 1, 4, 4, 36])


@pytest.mark.parametrize("call, message", [
    (lambda: adm.statistics(np.zeros((1, 4))), "N >= 2"),
    (lambda: adm.statistics(np.array([[1.0, np.nan], [0, 0]])), "NaN"),
    (lambda: adm.statistics(np.empty((3, 3), object)), "numeric"),
    (lambda: adm.frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2)), "NaN"),
    (lambda: adm.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3)), "expected"),
    (lambda: adm.precision_recall(np.zeros((3, 2)), np.zeros((9, 2))), "more than 3"),
])
def test_bad_metric_inputs(call, message):
    with pytest.raises(MetricsInputError, match=message):
        call()


# ---------------------------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def inception():
    return InceptionV3.load(compiler_options=conv_compiler_options())


@pytest.fixture(scope="module")
def batches(tmp_path_factory, inception):
    """A reference (with statistics, via write_reference) and a sample batch of 32 px images."""
    rng = np.random.default_rng(7)
    d = tmp_path_factory.mktemp("batches")
    ref_images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    smp_images = np.clip(ref_images[:5].astype(int) + rng.integers(-40, 40, (5, 32, 32, 3)), 0, 255)
    smp_images = smp_images.astype(np.uint8)
    ref_feats = inception.features(ref_images, batch_size=BATCH)
    adm.write_reference(d / "ref.npz", ref_images, ref_feats, feature_id=inception.feature_id)
    adm.write_reference(d / "ref_cached.npz", ref_images, ref_feats, feature_id=inception.feature_id,
                        images_features=ref_feats, images_index=np.arange(10, 16))
    np.savez(d / "ref_plain.npz", arr_0=ref_images)  # an ADM batch without statistics or metadata
    np.savez(d / "samples.npz", arr_0=smp_images)
    smp_feats = inception.features(smp_images, batch_size=BATCH)
    return d, ref_feats, smp_feats


def record_frechet(monkeypatch):
    """Replace FID's 2048-d linear algebra (about a minute per call on 2 cores; the function itself is
    checked above at 48 dims) by a recorder of the statistics it is given."""
    calls = []

    def fake(mu1, sigma1, mu2, sigma2, method="sqrtm", factor1=None):
        calls.append((mu1, sigma1, mu2, sigma2, method, factor1))
        return float(len(calls))

    monkeypatch.setattr(adm, "frechet_distance", fake)
    return calls


def test_features_of_reference_images_are_read_back_not_recomputed(batches, inception, monkeypatch):
    """The yardsticks' real images are reference images: their features come from the reference (by data
    index position) and evaluate takes them as given, running Inception on nothing."""
    d, ref, smp = batches
    got = adm.reference_features(d / "ref_cached.npz", [15, 11, 12, 10])
    for k in ("pool_3", "spatial"):
        np.testing.assert_array_equal(got[k], ref[k][[5, 1, 2, 0]])
    assert adm.reference_features(d / "ref_cached.npz", [11, 16]) is None  # 16 is not in the reference
    assert adm.reference_features(d / "ref.npz", [11]) is None  # written without them
    monkeypatch.setattr(adm, "batch_features", lambda *a, **k: pytest.fail("Inception ran"))
    calls = record_frechet(monkeypatch)
    adm.evaluate(d / "ref_cached.npz", d / "samples.npz", inception, sample_features=got)
    np.testing.assert_allclose(calls[0][0], got["pool_3"].astype(np.float64).mean(0), rtol=1e-12)


@pytest.mark.slow
def test_evaluate_wires_features_to_metrics(batches, inception, monkeypatch):
    d, ref, smp = batches
    calls = record_frechet(monkeypatch)
    read = []
    real_batch_features = adm.batch_features
    monkeypatch.setattr(adm, "batch_features",
                        lambda path, *a, **k: read.append(Path(path).name) or real_batch_features(path, *a, **k))
    for ref_file in ("ref.npz", "ref_plain.npz", "ref_cached.npz"):
        calls.clear()
        read.clear()
        res = adm.evaluate(d / ref_file, d / "samples.npz", inception, batch_size=BATCH)
        # a reference that carries pool_3 of its arr_0 needs no Inception pass of its own
        assert read == (["samples.npz"] if ref_file == "ref_cached.npz" else [ref_file, "samples.npz"])
        assert set(res) == {"inception_score", "fid", "sfid", "precision", "recall"}
        assert res["inception_score"] is None  # TorchScript weights: no softmax layer
        assert (res["fid"], res["sfid"]) == (1.0, 2.0)
        for (mu1, s1, mu2, s2, method, factor1), feat in zip(calls, ("pool_3", "spatial")):
            assert method == "sqrtm" and factor1 is None  # ADM's, unless asked otherwise
            a, b = smp[feat].astype(np.float64), ref[feat].astype(np.float64)
            np.testing.assert_allclose(mu1, a.mean(0), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(s1, np.cov(a, rowvar=False), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(mu2, b.mean(0), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(s2, np.cov(b, rowvar=False), rtol=1e-10, atol=1e-12)
        assert (res["precision"], res["recall"]) == pr_reference(ref["pool_3"], smp["pool_3"])
    calls.clear()
    adm.evaluate(d / "ref_cached.npz", d / "samples.npz", inception, batch_size=BATCH, fid_method="eigh")
    for (_, s1, _, _, method, factor1), feat in zip(calls, ("pool_3", "spatial")):  # eigh gets the samples' factor
        assert method == "eigh" and factor1.shape == smp[feat].shape
        np.testing.assert_allclose(factor1.T @ factor1, s1, rtol=1e-10, atol=1e-12)


def test_eigh_gets_a_factor_only_with_fewer_samples_than_dims(monkeypatch):
    calls = record_frechet(monkeypatch)  # 400 x 48: the D x D path, so no (N, D) copy is built for it
    for n in (20, 400):
        adm._fid_of(gaussian_features(8, n=n), adm.statistics(gaussian_features(9)), "features", "eigh")
    assert [c[5] is None for c in calls] == [False, True]


def test_reference_file_holds_adm_keys_and_metadata(batches, inception):
    d, ref, _ = batches
    with np.load(d / "ref.npz", allow_pickle=False) as z:
        assert {"arr_0", "mu", "sigma", "mu_s", "sigma_s"} <= set(z.files)
        assert z["mu"].shape == (2048,) and z["sigma_s"].shape == (2023, 2023)
        np.testing.assert_allclose(z["mu"], ref["pool_3"].astype(np.float64).mean(0))
    meta = adm.read_meta(d / "ref.npz")
    assert meta["feature_id"] == inception.feature_id and meta["image_size"] == [32, 32]


def test_cli_prints_adm_lines_and_json(batches, capsys, tmp_path, monkeypatch):
    d, _, _ = batches
    calls = record_frechet(monkeypatch)
    out = tmp_path / "m.json"
    assert adm.main([str(d / "ref.npz"), str(d / "samples.npz"), "--json", str(out),
                     "--batch-size", str(BATCH), "--fid-method", "eigh"]) == 0
    assert [c[4] for c in calls] == ["eigh", "eigh"]
    text = capsys.readouterr().out
    assert "Inception Score: unavailable" in text and "\nFID: " in text and "\nRecall: " in text
    assert json.loads(out.read_text())["inception_score"] is None
    assert json.loads(out.read_text())["fid"] == 1.0


def _bad_batches(tmp, inception, ref_images):
    """(reference, sample, expected message) for each way a batch can be wrong."""
    feats = {"pool_3": np.random.default_rng(0).normal(size=(4, 2048)),
             "spatial": np.random.default_rng(1).normal(size=(4, 2023))}
    good = tmp / "samples.npz"
    np.savez(good, arr_0=ref_images)
    cases = []
    np.savez(tmp / "float.npz", arr_0=ref_images.astype(np.float32))
    cases.append((good, tmp / "float.npz", "dtype float32"))
    np.savez(tmp / "rank3.npz", arr_0=ref_images[0])
    cases.append((good, tmp / "rank3.npz", r"expected \(N, H, W, 3\)"))
    np.savez(tmp / "pickled.npz", arr_0=np.array([{"x": 1}, None], dtype=object))
    cases.append((good, tmp / "pickled.npz", "object array"))
    np.savez(tmp / "big.npz", arr_0=np.zeros((2, 64, 64, 3), np.uint8))
    cases.append((tmp / "big.npz", good, "64x64 but samples"))
    adm.write_reference(tmp / "other_net.npz", ref_images, feats, feature_id="some-other-network")
    cases.append((tmp / "other_net.npz", good, "some-other-network"))
    np.savez(tmp / "nan_stats.npz", arr_0=ref_images, mu=np.full(2048, np.nan), sigma=np.eye(2048),
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    cases.append((tmp / "nan_stats.npz", good, "nan_stats.npz: mu/sigma: statistics contain NaN"))
    np.savez(tmp / "no_arr.npz", images=ref_images)
    cases.append((tmp / "no_arr.npz", good, "has no 'arr_0'"))
    (tmp / "junk.npz").write_bytes(b"junk")
    cases.append((tmp / "junk.npz", good, "not an .npz"))
    return cases


def test_bad_batches_fail_with_one_clear_error(tmp_path, inception):
    ref_images = np.random.default_rng(8).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    for ref, smp, message in _bad_batches(tmp_path, inception, ref_images):
        with pytest.raises(MetricsInputError, match=message):
            adm.evaluate(ref, smp, inception, batch_size=BATCH)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        adm.evaluate(tmp_path / "missing.npz", tmp_path / "samples.npz", inception)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.float64))
    assert adm.main([str(tmp_path / "s.npz"), str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "s.npz" in err


def test_write_reference_rejects_float_images(tmp_path):
    feats = {"pool_3": np.zeros((3, 2048)), "spatial": np.zeros((3, 2023))}
    with pytest.raises(MetricsInputError, match="must be uint8"):
        adm.write_reference(tmp_path / "r.npz", np.zeros((3, 8, 8, 3), np.float32), feats, feature_id="x")
    assert not (tmp_path / "r.npz").exists()
