"""The KL autoencoder of Stable Diffusion (diffusers' `AutoencoderKL`) in Flax linen, NHWC.

Architecture-identical to diffusers 0.42 `AutoencoderKL` with `DownEncoderBlock2D` / `UpDecoderBlock2D`
blocks, SiLU, quant / post-quant 1x1 convs and a one-head mid-block attention, so a diffusers state dict
(e.g. `stabilityai/sd-vae-ft-ema`) converts key for key. Module names mirror diffusers' (with `.N`
written `_N`), which is what lets `convert_diffusers_state_dict` derive every torch key from our tree.

Usage (params are the inner `params` collection, not the `{"params": ...}` variables dict):

    model = AutoencoderKL(config)
    mean, logvar = model.apply({"params": params}, x, method=AutoencoderKL.encode)   # x in [-1, 1]
    x = model.apply({"params": params}, z, method=AutoencoderKL.decode)              # z unscaled

Diffusion models see `z * config.scaling_factor`; divide by it again before `decode`.
File I/O lives in `load_pretrained` / `save` / `load` only; the model itself is pure.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util
from flax.linen.dtypes import promote_dtype

EPS = 1e-6  # diffusers uses eps=1e-6 in every GroupNorm of the VAE


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    mid_block_attention: bool = True

    def __post_init__(self):
        # Lists from JSON / YAML would make the frozen config unhashable (and so unusable as a module field).
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"norm_num_groups={self.norm_num_groups} does not divide block channel {c}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown VAEConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_diffusers(cls, config_json: dict) -> "VAEConfig":
        """Read a diffusers `AutoencoderKL` config.json dict; refuse variants this module does not build."""
        c = config_json
        n = len(c.get("block_out_channels", (64,)))
        expect = {
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "act_fn": "silu",
            "use_quant_conv": True,
            "use_post_quant_conv": True,
            # SD3 / Flux VAEs shift latents before scaling; our pipeline only knows a scale.
            "shift_factor": None,
            "latents_mean": None,
            "latents_std": None,
        }
        for key, want in expect.items():
            if key in c and (list(c[key]) if isinstance(c[key], (list, tuple)) else c[key]) != want:
                raise ValueError(f"diffusers config {key}={c[key]!r} is not supported (need {want!r})")
        # Defaults are diffusers' AutoencoderKL.__init__ defaults, not ours, since a config.json may omit them.
        return cls(
            in_channels=int(c.get("in_channels", 3)),
            out_channels=int(c.get("out_channels", 3)),
            block_out_channels=tuple(c.get("block_out_channels", (64,))),
            layers_per_block=int(c.get("layers_per_block", 1)),
            latent_channels=int(c.get("latent_channels", 4)),
            norm_num_groups=int(c.get("norm_num_groups", 32)),
            scaling_factor=float(c.get("scaling_factor", 0.18215)),
            mid_block_attention=bool(c.get("mid_block_add_attention", True)),
        )


# ---------------------------------------------------------------------------------------------- layers


MIN_CONV_FEATURES = 16


class NarrowConv(nn.Module):
    """nn.Conv (same params, same initialisers) for convolutions with fewer than MIN_CONV_FEATURES output
    channels, run with the kernel zero-padded to MIN_CONV_FEATURES outputs and the result sliced back.

    XLA:CPU picks among several paths for a convolution with 3 or 4 output channels at run time, and which
    one it takes follows the number of XLA:CPU devices in the process: the decoder's conv_out gave one set
    of bytes on 1, 2 and 4 devices and another on 3 and 5; the conv alone, at 16 to 512 input channels on
    1 to 8 devices, up to four. Padded to 8, 16 or 32 output channels it gave one set of bytes on all of
    them (the padding adds zeros only, so the maths is the same). This is what keeps decoded samples the
    same bytes on any device count (tests/test_vae.py)."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    pad: int = 0

    @nn.compact
    def __call__(self, x):
        k, f = self.kernel_size, self.features
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], f), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (f,), jnp.float32)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=None)  # nn.Conv's dtype rule
        wide = jnp.pad(kernel, ((0, 0), (0, 0), (0, 0), (0, max(MIN_CONV_FEATURES - f, 0))))
        y = jax.lax.conv_general_dilated(x, wide, (self.stride, self.stride),
                                         ((self.pad, self.pad), (self.pad, self.pad)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y[..., :f] + bias


def _conv(features: int, name: str, kernel: int = 3, stride: int = 1, pad: int | None = None) -> nn.Module:
    pad = kernel // 2 if pad is None else pad
    if features < MIN_CONV_FEATURES:
        return NarrowConv(features, kernel, stride, pad, name=name)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   name=name)


def _norm(groups: int, name: str) -> nn.GroupNorm:
    # Two-pass variance: matches torch's GroupNorm to float32 rounding, which the parity test relies on.
    return nn.GroupNorm(num_groups=groups, epsilon=EPS, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without time embedding: norm-act-conv twice, 1x1 shortcut on width change."""

    out_channels: int
    groups: int

    @nn.compact
    def __call__(self, x):
        h = _conv(self.out_channels, "conv1")(nn.silu(_norm(self.groups, "norm1")(x)))
        h = _conv(self.out_channels, "conv2")(nn.silu(_norm(self.groups, "norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, "conv_shortcut", kernel=1)(x)
        return x + h


class Downsample(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x):
        # diffusers' VAE pads right/bottom only (0, 1, 0, 1), then a padding-free stride-2 conv.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, "conv", stride=2, pad=0)(x)


class Upsample(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        return _conv(self.channels, "conv")(x)


class MidAttention(nn.Module):
    """diffusers Attention as the VAE uses it: one head of width C over all H*W positions, residual."""

    groups: int

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = _norm(self.groups, "group_norm")(x).reshape(b, hgt * wid, c)
        q = nn.Dense(c, name="to_q")(h)
        k = nn.Dense(c, name="to_k")(h)
        v = nn.Dense(c, name="to_v")(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(c)
        w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        h = nn.Dense(c, name="to_out_0")(jnp.einsum("bqk,bkc->bqc", w, v))
        return x + h.reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
    channels: int
    groups: int
    attention: bool

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock(self.channels, self.groups, name="resnets_0")(x)
        if self.attention:
            x = MidAttention(self.groups, name="attentions_0")(x)
        return ResnetBlock(self.channels, self.groups, name="resnets_1")(x)


class DownBlock(nn.Module):
    """diffusers DownEncoderBlock2D."""

    channels: int
    groups: int
    num_layers: int
    add_downsample: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.channels, self.groups, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample(self.channels, name="downsamplers_0")(x)
        return x


class UpBlock(nn.Module):
    """diffusers UpDecoderBlock2D."""

    channels: int
    groups: int
    num_layers: int
    add_upsample: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.channels, self.groups, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample(self.channels, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        chans, g = cfg.block_out_channels, cfg.norm_num_groups
        x = _conv(chans[0], "conv_in")(x)
        for i, c in enumerate(chans):
            x = DownBlock(c, g, cfg.layers_per_block, add_downsample=i < len(chans) - 1,
                           name=f"down_blocks_{i}")(x)
        x = MidBlock(chans[-1], g, cfg.mid_block_attention, name="mid_block")(x)
        x = nn.silu(_norm(g, "conv_norm_out")(x))
        return _conv(2 * cfg.latent_channels, "conv_out")(x)


class Decoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        chans, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        x = _conv(chans[0], "conv_in")(z)
        x = MidBlock(chans[0], g, cfg.mid_block_attention, name="mid_block")(x)
        for i, c in enumerate(chans):
            # One more resnet per block than the encoder, as in diffusers' Decoder.
            x = UpBlock(c, g, cfg.layers_per_block + 1, add_upsample=i < len(chans) - 1,
                         name=f"up_blocks_{i}")(x)
        x = nn.silu(_norm(g, "conv_norm_out")(x))
        return _conv(cfg.out_channels, "conv_out")(x)


class AutoencoderKL(nn.Module):
    config: VAEConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = _conv(2 * cfg.latent_channels, "quant_conv", kernel=1)
        self.post_quant_conv = _conv(cfg.latent_channels, "post_quant_conv", kernel=1)

    def encode(self, x):
        """x: NHWC in [-1, 1] -> (mean, logvar) of the diagonal Gaussian posterior, unscaled."""
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp

    def decode(self, z):
        """z: unscaled latents NHWC -> images NHWC (nominally [-1, 1], not clipped)."""
        return self.decoder(self.post_quant_conv(z))

    def __call__(self, x, key):
        mean, logvar = self.encode(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return self.decode(z), mean, logvar


def vae_loss(recon, x, mean, logvar, kl_weight: float, recon_loss: str = "mse"):
    """Reconstruction + kl_weight * KL(q(z|x) || N(0, I)); returns (loss, aux dict of its terms).

    Both terms are means per element (recon over pixels, KL over latent entries), so kl_weight does not
    change meaning with resolution or batch size. (SD's LDM sums both instead and uses kl_weight 1e-6 with
    a perceptual + GAN loss; here a plain pixel loss is enough for small images.)
    recon_loss: "mse" or "l1".
    """
    diff = recon.astype(jnp.float32) - x.astype(jnp.float32)
    if recon_loss == "mse":
        rec = jnp.mean(diff**2)
    elif recon_loss == "l1":
        rec = jnp.mean(jnp.abs(diff))
    else:
        raise ValueError(f"recon_loss must be 'mse' or 'l1', got {recon_loss!r}")
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
    loss = rec + kl_weight * kl
    return loss, {"loss": loss, "recon": rec, "kl": kl}


# ---------------------------------------------------------------------------------------------- weights


def param_shapes(config: VAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter path of our model and its shape, without allocating or running anything."""
    model = AutoencoderKL(config)
    x = jax.ShapeDtypeStruct((1, 8 * config.downsample_factor, 8 * config.downsample_factor,
                              config.in_channels), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, jax.random.key(1))["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def init_params(config: VAEConfig, key: jax.Array) -> dict:
    """Fresh params initialised as PyTorch's defaults (what diffusers' AutoencoderKL trains from).

    Conv / dense kernels and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's kaiming_uniform with
    a=sqrt(5)); GroupNorm scale 1, bias 0. All draws come from one uniform vector under `key`, sliced in
    sorted path order: on CPU, compiling `model.init` (a threefry per parameter) takes 10-20 s, this <1 s.
    """
    shapes = param_shapes(config)
    total = sum(math.prod(s) for s in shapes.values())
    flat_u = np.asarray(jax.random.uniform(key, (total,), jnp.float32, -1.0, 1.0))
    out, offset = {}, 0
    for path in sorted(shapes):
        shape, leaf = shapes[path], path[-1]
        size = math.prod(shape)
        draw = flat_u[offset:offset + size].reshape(shape)
        offset += size
        kernel = shapes.get(path[:-1] + ("kernel",))
        if kernel is None:  # GroupNorm
            out[path] = np.ones(shape, np.float32) if leaf == "scale" else np.zeros(shape, np.float32)
        else:
            fan_in = math.prod(kernel[:-1])  # (kh, kw, in) for convs, (in,) for dense
            out[path] = draw / math.sqrt(fan_in)
    return traverse_util.unflatten_dict(out)


# diffusers renamed the attention projections in 0.x; old checkpoints (sd-vae-ft-ema's safetensors
# among them) still carry the old names, which diffusers maps on load. We do the same.
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _torch_key(path: tuple[str, ...]) -> str:
    """Our path -> diffusers key: `down_blocks_0` -> `down_blocks.0`, kernel/scale -> weight."""
    *mods, leaf = path
    parts = []
    for m in mods:
        head, _, tail = m.rpartition("_")
        parts.append(f"{head}.{tail}" if head and tail.isdigit() else m)
    parts.append("bias" if leaf == "bias" else "weight")
    return ".".join(parts)


def _normalise_key(key: str) -> str:
    *mods, leaf = key.split(".")
    if len(mods) >= 3 and mods[-3] == "attentions" and mods[-1] in _DEPRECATED_ATTENTION:
        mods[-1] = _DEPRECATED_ATTENTION[mods[-1]]
    return ".".join(mods + [leaf])


def _to_flax(leaf: str, value: np.ndarray, want: tuple[int, ...], key: str) -> np.ndarray:
    v = np.asarray(value, dtype=np.float32)
    if leaf == "kernel" and len(want) == 4:
        if v.ndim != 4:
            raise ValueError(f"{key}: expected a 4-d conv weight, got shape {v.shape}")
        v = v.transpose(2, 3, 1, 0)  # torch (O, I, kh, kw) -> flax (kh, kw, I, O)
    elif leaf == "kernel" and len(want) == 2:
        if v.ndim == 4 and v.shape[2:] == (1, 1):
            v = v[:, :, 0, 0]  # original LDM checkpoints store attention projections as 1x1 convs
        if v.ndim != 2:
            raise ValueError(f"{key}: expected a 2-d linear weight, got shape {v.shape}")
        v = v.T  # torch (O, I) -> flax (I, O)
    if v.shape != want:
        raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit our {want}")
    return v


def convert_diffusers_state_dict(state_dict: dict[str, Any], config: VAEConfig) -> dict:
    """A diffusers AutoencoderKL state dict (numpy or torch-convertible arrays) -> our params.

    Exact: a missing key, an unexpected key or a shape that does not fit raises ValueError naming it.
    """
    given = {}
    for k, v in state_dict.items():
        nk = _normalise_key(k)
        if nk in given:
            raise ValueError(f"{k}: duplicate of {nk} after renaming deprecated attention keys")
        given[nk] = v
    flat = {}
    for path, shape in param_shapes(config).items():
        key = _torch_key(path)
        if key not in given:
            raise ValueError(f"missing key in state dict: {key}")
        flat[path] = _to_flax(path[-1], np.asarray(given.pop(key)), shape, key)
    if given:
        raise ValueError(f"unexpected key(s) in state dict: {', '.join(sorted(given)[:5])}"
                         + (f" (+{len(given) - 5} more)" if len(given) > 5 else ""))
    return traverse_util.unflatten_dict(flat)


def check_params(params: dict, config: VAEConfig) -> None:
    """Raise ValueError naming the first missing / extra / misshapen / non-finite parameter."""
    want = param_shapes(config)
    have = traverse_util.flatten_dict(params)
    for path, shape in want.items():
        name = "/".join(path)
        if path not in have:
            raise ValueError(f"missing parameter {name}")
        arr = np.asarray(have[path])
        if tuple(arr.shape) != shape:
            raise ValueError(f"parameter {name}: shape {tuple(arr.shape)}, expected {shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"parameter {name}: holds NaN or Inf")
    extra = sorted("/".join(p) for p in set(have) - set(want))
    if extra:
        raise ValueError(f"unexpected parameter(s): {', '.join(extra[:5])}")


# ---------------------------------------------------------------------------------------------- files

WEIGHTS = "vae.msgpack"
CONFIG = "config.json"
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def _diffusers_dir(folder: Path) -> Path:
    """Accept a model folder, a pipeline folder with `vae/`, or a HF-cache `models--org--name` folder."""
    if (folder / "config.json").is_file():
        return folder
    if (folder / "vae" / "config.json").is_file():
        return folder / "vae"
    snapshots = folder / "snapshots"
    if snapshots.is_dir():
        ref = folder / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return _diffusers_dir(snapshots / ref.read_text().strip())
        found = sorted(p for p in snapshots.iterdir() if (p / "config.json").is_file())
        if len(found) == 1:
            return found[0]
        raise ValueError(f"{folder}: {len(found)} snapshots and no refs/main; pass the snapshot folder")
    raise ValueError(f"{folder}: no config.json (expected a diffusers AutoencoderKL folder)")


def load_pretrained(folder: str | Path) -> tuple[VAEConfig, dict]:
    """A local diffusers AutoencoderKL folder (config.json + safetensors) -> (config, params).

    Reads safetensors only, through its numpy API: no pickle ever runs. A `.bin`-only folder is refused.
    """
    from safetensors.numpy import load_file

    folder = _diffusers_dir(Path(folder))
    config = VAEConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    for name in _DIFFUSERS_WEIGHTS:
        if (folder / name).is_file():
            state = load_file(str(folder / name))
            break
    else:
        raise ValueError(f"{folder}: no {_DIFFUSERS_WEIGHTS[0]} (pickled .bin weights are not loaded; "
                         "convert them to safetensors first)")
    params = convert_diffusers_state_dict(state, config)
    check_params(params, config)
    return config, params


def save(folder: str | Path, config: VAEConfig, params: dict) -> None:
    """Our format: `vae.msgpack` (flax msgpack of params) + `config.json` (every VAEConfig field)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=np.float32), params)
    (folder / WEIGHTS).write_bytes(serialization.msgpack_serialize(params))
    (folder / CONFIG).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def load(folder: str | Path) -> tuple[VAEConfig, dict]:
    """Read what `save` wrote; checks every parameter's presence, shape and finiteness."""
    folder = Path(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise ValueError(f"{folder / name}: missing (expected the output of the vae stage)")
    config = VAEConfig.from_dict(json.loads((folder / CONFIG).read_text()))
    params = serialization.msgpack_restore((folder / WEIGHTS).read_bytes())
    check_params(params, config)
    return config, params
