"""Inception-2015-12-05 (the graph behind FID, sFID, IS and ADM's evaluator) in JAX, NHWC.

The forward pass follows the TF graph node for node: ResizeBilinear to 299 (TF1, align_corners=False,
no half-pixel centres), (x - 128) / 128, then conv+BN+ReLU layers with the graph's VALID/SAME padding,
TF's average pooling that excludes padding, and mixed_10's max-pooled tower. Outputs:
- pool_3 (N, 2048): the final 8x8 average pool (FID, precision/recall);
- spatial (N, 2023): mixed_6/conv, first 7 channels, flattened NHWC (sFID);
- logits (N, 1008): pool_3 @ softmax/weights, no bias, when the source has that layer (IS).

Resize and network are two jitted functions so that the network compiles once per batch size, whatever
the image size. Convolutions and the logits matmul use HIGHEST precision: accelerators would otherwise
drop to TF32/bf16 and move FID. The network's `compiler_options` come from the caller: the stages pass
`dit.backend.conv_compiler_options()`, which on CPU compiles it with XLA's Eigen convolutions rather than its
YNNPACK ones (the same features, about twice the throughput); this package imports nothing of the model's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from metrics import inception_weights
from metrics.errors import MetricsInputError

SIZE = 299
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]: 17 * 17 * 7 = 2023 features
HIGHEST = lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------- resize


def _tf1_interpolation(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF1 legacy bilinear weights: src = dst * (in / out) in float32, as TF's LegacyScaler does."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    floor = np.floor(src)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    return lower, upper, (src - floor).astype(np.float32)


def resize_bilinear_tf1(images: jax.Array, out_h: int = SIZE, out_w: int = SIZE) -> jax.Array:
    """`tf.compat.v1.image.resize_bilinear(align_corners=False)` on float32 NHWC, same operation order."""
    y0, y1, ly = _tf1_interpolation(images.shape[1], out_h)
    x0, x1, lx = _tf1_interpolation(images.shape[2], out_w)
    top, bottom = images[:, y0], images[:, y1]
    lx = lx[None, None, :, None]
    t = top[:, :, x0] + (top[:, :, x1] - top[:, :, x0]) * lx
    b = bottom[:, :, x0] + (bottom[:, :, x1] - bottom[:, :, x0]) * lx
    return t + (b - t) * ly[None, :, None, None]


def _preprocess(images: jax.Array) -> jax.Array:
    """Images 0..255 (uint8 or float), any size -> the graph's 299x299 input in [-1, 1)."""
    x = resize_bilinear_tf1(images.astype(jnp.float32))
    return (x - 128.0) * (1.0 / 128.0)  # the graph's Sub(128), Mul(1/128); exact in float32


# ---------------------------------------------------------------------------------------------- layers


def _conv(p: dict, x: jax.Array, stride: int = 1, valid: bool = False) -> jax.Array:
    """Conv (BN folded in) + ReLU. SAME with stride 1 and odd kernels is symmetric padding in TF."""
    kh, kw = p["w"].shape[:2]
    pad = ((0, 0), (0, 0)) if valid else ((kh // 2, kh // 2), (kw // 2, kw // 2))
    y = lax.conv_general_dilated(x, p["w"], (stride, stride), pad,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
    return jax.nn.relu(y + p["b"])


def _max_pool(x: jax.Array, stride: int = 2, same: bool = False) -> jax.Array:
    pad = ((0, 0), (1, 1), (1, 1), (0, 0)) if same else ((0, 0),) * 4
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def _avg_pool_same(x: jax.Array) -> jax.Array:
    """3x3 stride-1 SAME average that, like TF's AvgPool, divides by the in-image count only."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)

    def counts(n: int) -> np.ndarray:
        c = np.full(n, 3.0, np.float32)
        c[0] -= 1
        c[-1] -= 1
        return c

    count = np.outer(counts(x.shape[1]), counts(x.shape[2]))[None, :, :, None]
    return total / count


# ---------------------------------------------------------------------------------------------- blocks


def _block_35(p: dict, x: jax.Array, m: str) -> jax.Array:
    """mixed, mixed_1, mixed_2: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
    c = lambda name, h, **kw: _conv(p[f"{m}/{name}"], h, **kw)
    return jnp.concatenate([
        c("conv", x),
        c("tower/conv_1", c("tower/conv", x)),
        c("tower_1/conv_2", c("tower_1/conv_1", c("tower_1/conv", x))),
        c("tower_2/conv", _avg_pool_same(x)),
    ], axis=-1)


def _block_reduce_35(p: dict, x: jax.Array) -> jax.Array:
    """mixed_3 (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""
    c = lambda name, h, **kw: _conv(p[f"mixed_3/{name}"], h, **kw)
    return jnp.concatenate([
        c("conv", x, stride=2, valid=True),
        c("tower/conv_2", c("tower/conv_1", c("tower/conv", x)), stride=2, valid=True),
        _max_pool(x),
    ], axis=-1)


def _block_17(p: dict, x: jax.Array, m: str) -> tuple[jax.Array, jax.Array]:
    """mixed_4..7: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1. Also returns the 1x1 branch
    (mixed_K/conv), which is sFID's spatial feature for K = 6."""
    c = lambda name, h: _conv(p[f"{m}/{name}"], h)
    first = c("conv", x)
    t = c("tower/conv_2", c("tower/conv_1", c("tower/conv", x)))
    t1 = c("tower_1/conv", x)
    for name in ("tower_1/conv_1", "tower_1/conv_2", "tower_1/conv_3", "tower_1/conv_4"):
        t1 = c(name, t1)
    return jnp.concatenate([first, t, t1, c("tower_2/conv", _avg_pool_same(x))], axis=-1), first


def _block_reduce_17(p: dict, x: jax.Array) -> jax.Array:
    """mixed_8 (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""
    c = lambda name, h, **kw: _conv(p[f"mixed_8/{name}"], h, **kw)
    t1 = c("tower_1/conv_2", c("tower_1/conv_1", c("tower_1/conv", x)))
    return jnp.concatenate([
        c("tower/conv_1", c("tower/conv", x), stride=2, valid=True),
        c("tower_1/conv_3", t1, stride=2, valid=True),
        _max_pool(x),
    ], axis=-1)


def _block_8(p: dict, x: jax.Array, m: str, max_pool_tower: bool) -> jax.Array:
    """mixed_9, mixed_10: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1. The 2015 graph pools
    mixed_10's last tower with a max, not an average."""
    c = lambda name, h: _conv(p[f"{m}/{name}"], h)
    a = c("tower/conv", x)
    b = c("tower_1/conv_1", c("tower_1/conv", x))
    pooled = _max_pool(x, stride=1, same=True) if max_pool_tower else _avg_pool_same(x)
    return jnp.concatenate([
        c("conv", x),
        c("tower/mixed/conv", a), c("tower/mixed/conv_1", a),
        c("tower_1/mixed/conv", b), c("tower_1/mixed/conv_1", b),
        c("tower_2/conv", pooled),
    ], axis=-1)


def forward(params: dict, x: jax.Array) -> dict[str, jax.Array]:
    """The network on preprocessed (N, 299, 299, 3) inputs."""
    p = params["convs"]
    x = _conv(p["conv"], x, stride=2, valid=True)  # 149
    x = _conv(p["conv_1"], x, valid=True)  # 147
    x = _conv(p["conv_2"], x)  # 147
    x = _max_pool(x)  # 73
    x = _conv(p["conv_3"], x, valid=True)  # 73
    x = _conv(p["conv_4"], x, valid=True)  # 71
    x = _max_pool(x)  # 35
    for m in ("mixed", "mixed_1", "mixed_2"):
        x = _block_35(p, x, m)
    x = _block_reduce_35(p, x)  # 17
    spatial = None
    for m in ("mixed_4", "mixed_5", "mixed_6", "mixed_7"):
        x, first = _block_17(p, x, m)
        if m == "mixed_6":
            spatial = first[..., :SPATIAL_CHANNELS]
    x = _block_reduce_17(p, x)  # 8
    x = _block_8(p, x, "mixed_9", max_pool_tower=False)
    x = _block_8(p, x, "mixed_10", max_pool_tower=True)
    pool_3 = jnp.mean(x, axis=(1, 2))  # pool_3: 8x8 VALID average = the spatial mean
    out = {"pool_3": pool_3, "spatial": spatial.reshape(spatial.shape[0], -1)}
    if "softmax" in params:
        out["logits"] = jnp.dot(pool_3, params["softmax"], precision=HIGHEST)
    return out


@functools.cache
def programs(mesh: Mesh, compiler_options: tuple):
    """(resize, network), each mapped over the mesh's devices with shard_map: every device runs the
    single-device program on its own slice, so its compiled shapes are the per-device batch alone and a
    device's features do not depend on how many devices there are."""
    rows = P("batch")
    prep = jax.jit(jax.shard_map(_preprocess, mesh=mesh, in_specs=rows, out_specs=rows))
    net = jax.jit(jax.shard_map(forward, mesh=mesh, in_specs=(P(), rows), out_specs=rows),
                  compiler_options=dict(compiler_options) or None)
    return prep, net


# ---------------------------------------------------------------------------------------------- model


def check_images(images: Any, what: str = "images") -> np.ndarray:
    """NHWC, 3 channels, uint8 or float 0..255 (finite), else one clear MetricsInputError."""
    if not isinstance(images, np.ndarray):
        images = np.asarray(images)
    if images.dtype == object:
        raise MetricsInputError(f"{what}: object array (pickled data?); expected uint8 or float pixels")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise MetricsInputError(f"{what}: dtype {images.dtype}; expected uint8 or float in 0..255")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise MetricsInputError(f"{what}: shape {images.shape}; expected NHWC (N, H, W, 3) RGB"
                                + (" (looks NCHW: transpose to NHWC)" if images.ndim == 4
                                   and images.shape[1] == 3 else ""))
    if min(images.shape[1:3], default=0) < 1:
        raise MetricsInputError(f"{what}: empty image size {images.shape[1:3]}")
    if images.dtype != np.uint8 and images.size:
        lo, hi = float(np.min(images)), float(np.max(images))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise MetricsInputError(f"{what}: contains NaN or inf")
        if lo < 0.0 or hi > 255.0:
            raise MetricsInputError(f"{what}: float values span [{lo:g}, {hi:g}]; expected 0..255")
    return images


@dataclasses.dataclass(frozen=True, eq=False)
class InceptionV3:
    """Frozen Inception weights, replicated over a 1-D device mesh; `features` shards each batch on it."""

    source: str
    path: str
    weights_sha256: str  # of the folded feature weights: equal for both sources of one network
    params: dict = dataclasses.field(repr=False)
    mesh: Mesh = dataclasses.field(repr=False)
    compiler_options: tuple = dataclasses.field(default=(), repr=False)  # sorted (name, value) pairs

    @classmethod
    def load(cls, source: str = "torchscript", path: str | None = None, devices: list | None = None,
             compiler_options: dict | None = None) -> "InceptionV3":
        """`compiler_options`: XLA options for the network's jit (dit.backend.conv_compiler_options for the
        mesh's platform, as the stages pass them); None for XLA's defaults."""
        convs, softmax, resolved = inception_weights.load_params(source, path)
        mesh = Mesh(np.asarray(devices if devices is not None else jax.devices()), ("batch",))
        params = {"convs": convs} | ({"softmax": softmax} if softmax is not None else {})
        params = jax.device_put(params, NamedSharding(mesh, P()))
        return cls(source, str(resolved), inception_weights.params_sha256(convs), params, mesh,
                   tuple(sorted((compiler_options or {}).items())))

    @property
    def has_logits(self) -> bool:
        return "softmax" in self.params

    @property
    def feature_id(self) -> str:
        """What a reference batch records, so statistics from another network are rejected."""
        return f"inception-2015-12-05/sha256:{self.weights_sha256}"

    def features(self, images: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray | None]:
        """pool_3 (N, 2048), spatial (N, 2023), logits (N, 1008) or None; float32 numpy.

        `batch_size` is the batch of ONE device (the compiled shape); a call feeds batch_size x devices
        images, device d taking the d-th block of batch_size consecutive ones, and the tail is padded
        with zeros. Image i is thus always computed in the same block of the same shape, whatever the
        device count: the features are the same bytes on 1 device or 8 (on one machine).
        """
        images = check_images(images)
        per_device = max(1, int(batch_size))
        batch = per_device * self.mesh.devices.size
        sharding = NamedSharding(self.mesh, P("batch"))
        prep, net = programs(self.mesh, self.compiler_options)
        outs, pending = [], None
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            n = len(chunk)
            if n < batch:  # pad the last batch: one compiled shape, every block full
                chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
            result = net(self.params, prep(jax.device_put(chunk, sharding)))
            if pending is not None:  # fetch the previous batch while this one runs
                outs.append(_fetch(*pending))
            pending = (result, n)
        if pending is not None:
            outs.append(_fetch(*pending))
        return _concat(outs, self.has_logits)


def _fetch(result: dict, n: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[:n] for k, v in result.items()}


def _concat(outs: list[dict], has_logits: bool) -> dict[str, np.ndarray | None]:
    dims = {"pool_3": 2048, "spatial": 17 * 17 * SPATIAL_CHANNELS, "logits": 1008}
    res: dict[str, np.ndarray | None] = {}
    for key, dim in dims.items():
        if key == "logits" and not has_logits:
            res[key] = None
        elif outs:
            res[key] = np.concatenate([o[key] for o in outs])
        else:
            res[key] = np.zeros((0, dim), np.float32)
    return res
