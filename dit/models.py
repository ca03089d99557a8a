"""Diffusion Transformer (Peebles & Xie, 2023) in Flax linen, following facebookresearch/DiT models.py.

The model knows nothing about diffusion: it maps (x_t, t, y) to a noise (and variance) prediction.
Layout is NHWC throughout. Parameters are float32; `DiTConfig.dtype` sets the compute dtype.

Block designs (`DiTConfig.block`), the paper's Section 3.2 design space plus DiffiT's TMSA:
  adaln_zero  adaptive LayerNorm whose shift/scale/gate are regressed from c = t_emb + y_emb,
              the regressor zero-initialised so every block starts as the identity (the default).
  adaln       the same without gates (4*hidden modulation) and with a standard (xavier) init.
  cross_attn  plain pre-LN ViT block plus multi-head cross-attention to the 2 tokens [t_emb, y_emb].
  in_context  plain ViT blocks; t_emb and y_emb are two extra tokens, dropped before the final layer.
  tmsa        DiffiT's time-dependent self-attention: the conditioning token (here t_emb + y_emb, the
              class-conditional form) enters the q, k and v projections, with a learned 2-D relative
              position bias per block; LayerNorms are plain (affine); the final layer stays adaptive.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit.attention import self_attention
from dit.linear import dense_dot_general, matmul

BLOCKS = ("adaln_zero", "adaln", "cross_attn", "in_context", "tmsa")
DTYPES = ("float32", "bfloat16", "float16")
FREQ_DIM = 256  # size of the sinusoidal timestep features fed to the timestep MLP


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32  # latent H = W
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True  # out channels = 2 * in_channels
    block: str = "adaln_zero"
    dtype: str = "float32"  # compute dtype; params stay float32

    def __post_init__(self):
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
                     "num_classes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.input_size % self.patch_size:
            raise ValueError(f"DiTConfig.patch_size={self.patch_size} does not divide "
                             f"input_size={self.input_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig.num_heads={self.num_heads} does not divide "
                             f"hidden_size={self.hidden_size}")
        if self.hidden_size % 4:  # the 2-D sin-cos embedding splits hidden in 4 quarters
            raise ValueError(f"DiTConfig.hidden_size={self.hidden_size} must be a multiple of 4")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"DiTConfig.class_dropout_prob={self.class_dropout_prob} not in [0, 1)")
        if self.block not in BLOCKS:
            raise ValueError(f"DiTConfig.block={self.block!r} unknown; choose one of {BLOCKS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"DiTConfig.dtype={self.dtype!r} unknown; choose one of {DTYPES}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def num_label_rows(self) -> int:
        # The extra row is the "null" label used for classifier-free guidance.
        return self.num_classes + int(self.class_dropout_prob > 0)


# name -> (depth, hidden_size, num_heads); Table 1 of the paper.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
MODEL_NAMES = tuple(f"DiT-{s}/{p}" for s in SIZES for p in (8, 4, 2))


def dit_config(name: str | None = None, **overrides) -> DiTConfig:
    """A config by paper name ("DiT-XL/2"), with field overrides; name=None builds a custom one."""
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown DiTConfig field(s) {unknown}; known: {sorted(fields)}")
    if name is None:
        return DiTConfig(**overrides)
    size, _, patch = name.removeprefix("DiT-").partition("/")
    if not name.startswith("DiT-") or size not in SIZES or patch not in ("2", "4", "8"):
        raise ValueError(f"unknown DiT model name {name!r}; known: {', '.join(MODEL_NAMES)}")
    depth, hidden, heads = SIZES[size]
    base = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))
    return DiTConfig(**{**base, **overrides})


def check_labels(y, config: DiTConfig) -> None:
    """Raise ValueError if a concrete label array is out of range.

    Valid labels are 0..num_classes-1, plus num_classes (the null label) when the table has the
    null row. Traced values (inside jit) cannot be inspected, so callers that jit should check
    their labels here before the call; an out-of-range index under jit is silently clamped.
    """
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels y must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    hi = config.num_label_rows - 1
    if y.size and (y.min() < 0 or y.max() > hi):
        raise ValueError(f"labels y must lie in [0, {hi}] (num_classes={config.num_classes}"
                         f"{', null label included' if hi == config.num_classes else ''}), "
                         f"got min {y.min()} max {y.max()}")


# ---------------------------------------------------------------------------------------------
# Fixed embeddings (numpy float64 like the official code, cast on use)
# ---------------------------------------------------------------------------------------------

def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, dim) frozen position embedding, in the official (MAE) ordering.

    Kept bit-for-bit with the official code: meshgrid(w, h) puts the column index in grid[0],
    which feeds the first half of the channels ("emb_h").
    """
    coords = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(coords, coords), axis=0)  # (2, g, g); grid[0] varies along w
    emb_h = _sincos_1d(dim // 2, grid[0])
    emb_w = _sincos_1d(dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def frozen_param_count(config: DiTConfig) -> int:
    """Elements of the frozen position embedding: a constant here, a buffer in the official model."""
    return config.num_patches * config.hidden_size


def timestep_embedding(t, dim: int = FREQ_DIM, max_period: float = 10000.0):
    """GLIDE/ADM sinusoidal features, [cos, sin] order as in the official DiT."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def relative_position_index(grid_size: int) -> np.ndarray:
    """(T, T) index into a Swin-style ((2g-1)**2, heads) relative position bias table."""
    coords = np.stack(np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij"))
    coords = coords.reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + (grid_size - 1)  # (2, T, T), each in 0..2g-2
    return rel[0] * (2 * grid_size - 1) + rel[1]


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
normal002 = nn.initializers.normal(0.02)
Dense = functools.partial(nn.Dense, dot_general=dense_dot_general)  # nn.Dense with dit/linear.py's matmul
# The official code re-inits the conv weight as xavier on its (out, in*p*p) flattening, i.e. a linear.
patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)


def modulate(x, shift, scale):
    with jax.named_scope("modulate"):  # named scopes only label HLO ops for the profile
        return x * (1 + scale[:, None]) + shift[:, None]


_GELU_C = math.sqrt(2.0 / math.pi)


@jax.custom_vjp
def gelu_tanh(x):
    """nn.gelu(x, approximate=True), with a one-pass backward that keeps only x (recomputes tanh)."""
    return nn.gelu(x, approximate=True)


def _gelu_fwd(x):
    return gelu_tanh(x), x


def _gelu_bwd(x, g):
    x2 = x * x
    th = jnp.tanh(_GELU_C * x * (1 + 0.044715 * x2))
    dy = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * _GELU_C * (1 + 3 * 0.044715 * x2)
    return (g * dy.astype(g.dtype),)


gelu_tanh.defvjp(_gelu_fwd, _gelu_bwd)


def _plain_norm(name=None, dtype=None):
    return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, name=name, dtype=dtype)


def _affine_norm(name=None, dtype=None):
    return nn.LayerNorm(epsilon=1e-6, name=name, dtype=dtype)


class PatchEmbed(nn.Module):
    """A conv with kernel = stride = patch, written as reshape + matmul (the same maths; cheaper
    than a strided conv on CPU). Params look like nn.Conv's: kernel (p, p, C, D), bias (D,)."""
    patch_size: int
    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        p = self.patch_size
        kernel = self.param("kernel", patch_init, (p, p, c, self.features))
        bias = self.param("bias", zeros, (self.features,))
        x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(n, (h // p) * (w // p), p * p * c).astype(self.dtype)
        return matmul(x, kernel.reshape(p * p * c, -1).astype(self.dtype)) + bias.astype(self.dtype)


class TimestepEmbedder(nn.Module):
    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        h = timestep_embedding(t).astype(self.dtype)
        h = Dense(self.hidden_size, kernel_init=normal002, dtype=self.dtype, name="fc1")(h)
        return Dense(self.hidden_size, kernel_init=normal002, dtype=self.dtype, name="fc2")(nn.silu(h))


class Mlp(nn.Module):
    hidden_features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x = Dense(self.hidden_features, kernel_init=xavier, dtype=self.dtype, name="fc1")(x)
        with jax.named_scope("gelu"):
            x = gelu_tanh(x)
        return Dense(d, kernel_init=xavier, dtype=self.dtype, name="fc2")(x)


class DenseParams(nn.Module):
    """An nn.Dense's parameters (same names, shapes, init) without its matmul, for layers whose
    matmul is written elsewhere (dit/attention.py): checkpoints and converters see a plain Dense."""
    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, in_features: int, dtype):
        kernel = self.param("kernel", xavier, (in_features, self.features))
        bias = self.param("bias", zeros, (self.features,)) if self.use_bias else None
        return kernel.astype(dtype), None if bias is None else bias.astype(dtype)


class Attention(nn.Module):
    """timm-style self-attention with a fused qkv projection (q|k|v, each head-major).

    `cond` (N, D), if given, is DiffiT's time token: its projection is added to every token's
    q, k and v. `bias` (heads, T, T), if given, is added to the attention logits. The maths lives in
    dit/attention.py, which picks the formulation per backend.
    """
    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cond=None, bias=None):
        d = x.shape[-1]
        x = x.astype(self.dtype)
        qkv_k, qkv_b = DenseParams(3 * d, name="qkv")(d, self.dtype)
        qkv_add = None
        if cond is not None:
            qkv_add = Dense(3 * d, use_bias=False, kernel_init=xavier, dtype=self.dtype,
                            name="qkv_time")(cond)
        proj_k, proj_b = DenseParams(d, name="proj")(d, self.dtype)
        return self_attention(x, qkv_k, qkv_b, proj_k, proj_b, self.num_heads, qkv_add=qkv_add, bias=bias)


class CrossAttention(nn.Module):
    """Image tokens attend to a short context (here the 2 tokens [t_emb, y_emb])."""
    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        n, t, d = x.shape
        hd = d // self.num_heads
        q = Dense(d, kernel_init=xavier, dtype=self.dtype, name="q")(x).reshape(n, t, self.num_heads, hd)
        kv = Dense(2 * d, kernel_init=xavier, dtype=self.dtype, name="kv")(context)
        kv = kv.reshape(n, context.shape[1], 2, self.num_heads, hd)
        out = jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1])
        return Dense(d, kernel_init=xavier, dtype=self.dtype, name="proj")(out.reshape(n, t, d))


class DiTBlock(nn.Module):
    """One transformer block; `c` is (N, D) conditioning, `context` (N, 2, D) for cross_attn."""
    config: DiTConfig

    @nn.compact
    def __call__(self, x, c, context=None):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        d = cfg.hidden_size
        attn = Attention(cfg.num_heads, dtype=dt, name="attn")
        mlp = Mlp(int(d * cfg.mlp_ratio), dtype=dt, name="mlp")
        if cfg.block in ("adaln_zero", "adaln"):
            zero = cfg.block == "adaln_zero"
            # adaLN-Zero: zero init makes the gates 0, so each block starts as the identity.
            mod = Dense((6 if zero else 4) * d, kernel_init=zeros if zero else xavier, dtype=dt,
                           name="adaLN_modulation")(nn.silu(c))
            if zero:
                shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
                gate1, gate2 = gate1[:, None], gate2[:, None]
            else:
                shift1, scale1, shift2, scale2 = jnp.split(mod, 4, axis=-1)
                gate1 = gate2 = 1.0
            x = x + gate1 * attn(modulate(_plain_norm(dtype=dt)(x), shift1, scale1))
            return x + gate2 * mlp(modulate(_plain_norm(dtype=dt)(x), shift2, scale2))
        if cfg.block == "tmsa":
            # Each block learns its own Swin-style (2g-1)^2 x heads relative position bias table.
            g = cfg.grid_size
            table = self.param("rel_pos_table", normal002, ((2 * g - 1) ** 2, cfg.num_heads))
            rel_bias = table[relative_position_index(g)].transpose(2, 0, 1)  # (heads, T, T)
            x = x + attn(_affine_norm("norm1", dt)(x), cond=c, bias=rel_bias)
            return x + mlp(_affine_norm("norm2", dt)(x))
        # cross_attn and in_context use standard pre-LN ViT blocks.
        x = x + attn(_affine_norm("norm1", dt)(x))
        if cfg.block == "cross_attn":
            x = x + CrossAttention(cfg.num_heads, dtype=dt, name="cross_attn")(
                _affine_norm("norm_cross", dt)(x), context)
        return x + mlp(_affine_norm("norm2", dt)(x))


class LabelEmbedder(nn.Module):
    """Class label table with an extra null row; in train mode labels drop to it with prob p."""
    config: DiTConfig

    @nn.compact
    def __call__(self, y, train: bool = False):
        cfg = self.config
        table = self.param("embedding_table", normal002, (cfg.num_label_rows, cfg.hidden_size))
        if train and cfg.class_dropout_prob > 0:
            # Classifier-free guidance training: the null label stands for "unconditional".
            drop = jax.random.uniform(self.make_rng("dropout"), y.shape) < cfg.class_dropout_prob
            y = jnp.where(drop, cfg.num_classes, y)
        return jnp.take(table, y, axis=0).astype(jnp.dtype(cfg.dtype))


class FinalLayer(nn.Module):
    """LayerNorm (adaptive unless the block has no adaLN) + linear to p*p*out_channels, zero init."""
    config: DiTConfig

    @nn.compact
    def __call__(self, x, c):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        if cfg.block in ("adaln_zero", "adaln", "tmsa"):
            mod = Dense(2 * cfg.hidden_size, kernel_init=zeros, dtype=dt, name="adaLN_modulation")(nn.silu(c))
            shift, scale = jnp.split(mod, 2, axis=-1)
            x = modulate(_plain_norm(dtype=dt)(x), shift, scale)
        else:
            x = _affine_norm("norm", dt)(x)
        out = cfg.patch_size ** 2 * cfg.out_channels
        return Dense(out, kernel_init=zeros, dtype=dt, name="linear")(x)


class DiT(nn.Module):
    """`remat`: recompute each block's activations in the backward pass instead of keeping them (jax.checkpoint
    per block, train.remat): a training step's memory for ~1/3 more compute; the parameter tree and the
    forward pass are unchanged."""
    config: DiTConfig
    remat: bool = False

    @nn.compact
    def __call__(self, x, t, y, train: bool = False):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        n = x.shape[0]
        want = (cfg.input_size, cfg.input_size, cfg.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must be NHWC (N, {want[0]}, {want[1]}, {want[2]}), got {x.shape}")
        if t.shape != (n,) or y.shape != (n,):
            raise ValueError(f"t and y must have shape ({n},), got {t.shape} and {y.shape}")
        if not isinstance(y, jax.core.Tracer):
            check_labels(y, cfg)

        pos = jnp.asarray(get_2d_sincos_pos_embed(cfg.hidden_size, cfg.grid_size), dt)
        h = PatchEmbed(cfg.patch_size, cfg.hidden_size, dtype=dt, name="x_embedder")(x) + pos[None]
        t_emb = TimestepEmbedder(cfg.hidden_size, dtype=dt, name="t_embedder")(t)
        y_emb = LabelEmbedder(cfg, name="y_embedder")(y, train)
        c = t_emb + y_emb

        context = jnp.stack([t_emb, y_emb], axis=1) if cfg.block == "cross_attn" else None
        if cfg.block == "in_context":
            # Two extra tokens without position embedding, like ViT's cls token.
            h = jnp.concatenate([h, t_emb[:, None], y_emb[:, None]], axis=1)
        block = nn.remat(DiTBlock) if self.remat else DiTBlock
        for i in range(cfg.depth):
            h = block(cfg, name=f"blocks_{i}")(h, c, context)
        if cfg.block == "in_context":
            h = h[:, :-2]
        h = FinalLayer(cfg, name="final_layer")(h, c)
        return unpatchify(h.astype(jnp.float32), cfg.patch_size, cfg.out_channels)

    def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels: int | None = 3):
        """Classifier-free guidance as in the official code.

        The batch is [cond; uncond] halves (y's second half normally holds the null label); only the
        first half of x is used, for both halves. Guidance uncond + s * (cond - uncond) is applied to
        eps channels [:guided_channels] (official default 3; None = all eps channels) and duplicated to
        both halves; the remaining channels (the 4th eps channel, the variance) pass through per half.
        """
        cfg = self.config
        k = cfg.in_channels if guided_channels is None else guided_channels
        if not 0 < k <= cfg.in_channels:
            raise ValueError(f"guided_channels={guided_channels} must be in 1..{cfg.in_channels} or None")
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch ([cond; uncond]), got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        out = self(jnp.concatenate([half, half], axis=0), t, y)
        eps, rest = out[..., :k], out[..., k:]
        cond, uncond = jnp.split(eps, 2, axis=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return jnp.concatenate([jnp.concatenate([guided, guided], axis=0), rest], axis=-1)


def unpatchify(x, p: int, c: int):
    """(N, T, p*p*c) tokens -> (N, H, W, c); each token's features are ordered (p_row, p_col, c)."""
    n, t, _ = x.shape
    g = int(round(math.sqrt(t)))
    x = x.reshape(n, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, g * p, g * p, c)


def dummy_inputs(config: DiTConfig, batch: int = 1):
    s = config.input_size
    return (jnp.zeros((batch, s, s, config.in_channels), jnp.float32),
            jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32))


def init_params(config: DiTConfig, key):
    """The one init function: float32 params for DiT(config), initialised as the official code does."""
    model = DiT(config)
    return jax.jit(lambda k: model.init({"params": k}, *dummy_inputs(config))["params"])(key)


def param_shapes(config: DiTConfig):
    """Param ShapeDtypeStructs without allocating them (jax.eval_shape); counts XL for free."""
    return jax.eval_shape(lambda k: DiT(config).init({"params": k}, *dummy_inputs(config))["params"],
                          jax.random.key(0))
