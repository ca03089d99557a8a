"""Multi-head self-attention (projections + core), with the formulation chosen per backend HERE only.

Two formulations of the same maths (timm's Attention: a fused qkv linear, q|k|v each head-major, scaled
dot-product attention with a float32 softmax, an output linear):

  "fused"  x @ Wqkv -> (B, T, 3, H, D) -> jax.nn.dot_product_attention -> @ Wproj, JAX's default
           implementation: what XLA fuses on TPU, kept there unchanged.
  "heads"  the qkv projection is one plain GEMM x @ Wqkv, (B*T, 3C), then q, k, v go head-major,
           (B, H, T, D) each, by transposes that move whole D-rows, with a backward that writes dq, dk,
           dv into one (B, T, 3, H, D) gradient in one pass (`split_heads`: autodiff of the slices
           padded each to full size and added them, ~3 ms of every DiT-S/2 layer's ~25 ms core on
           XLA:CPU; the train step 1.5-3% faster); the core is two batched (B, H)
           matmuls around a float32 softmax, with its backward written out by hand (a custom VJP, about
           1.5x faster than autodiff's on XLA:CPU; every product in the form XLA:CPU gives to YNNPACK,
           `_backward`); the output goes back to (B, T, C) for one GEMM with
           Wproj. What XLA:CPU runs best (benchmarks/bench_train_step.py --profile). Writing the
           projection as an einsum straight into (3, B, H, T, D) looks copy-free, but XLA computes it
           as W^T x^T and then transposes (T, D) element by element to slice q, k, v: guided DiT-S/2
           sampling was 8% slower that way, the train step the same.

  "cudnn"  "fused" with jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's fused attention
           kernel, forward and backward. JAX's default implementation on GPU is XLA's own (unfused)
           attention; on an H100, DiT-XL/2's bfloat16 train step at batch 128 runs 587 img/s with cuDNN's
           kernel against 492 with XLA's and 504 with "heads" (benchmarks/bench_train_gpu.py). cuDNN takes
           half precision only, so a float32 model on GPU runs "fused".

`attention_impl()` is the one place that picks: "heads" on CPU, "cudnn" on (NVIDIA) GPU, "fused" elsewhere
(TPU); DIT_ATTENTION=fused|heads|cudnn overrides it (for tests and benchmarks). Parameters are passed in, so
all read the same checkpoint.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from dit.linear import choose_impl, matmul

IMPLS = ("fused", "heads", "cudnn")


def attention_impl(backend: str | None = None) -> str:
    return choose_impl("DIT_ATTENTION", IMPLS, {"cpu": "heads", "gpu": "cudnn"}, "fused", backend)


def _scales(d: int) -> tuple[float, float]:
    """(scale on q, scale on the logits) for head width d: 1/sqrt(d) goes on q where it is a power of two
    (d = 4^k: 16, 64, 256; DiT-S/B/L's 64), on the (T, T) logits otherwise (DiT-XL's 72, the embedded
    default's 32). Scaling by a power of two is exact, so either way the logits, the weights and the gradients
    are the same to the bit (q with subnormal entries aside). On q it is T x D multiplies instead of T x T, and
    XLA:CPU no longer materialises a (B, H, T, T) broadcast of the scale for the fusions that read the
    logits: DiT-S/2's train step ~2% faster (benchmarks/NOTES.md)."""
    scale = 1.0 / math.sqrt(d)
    return (scale, 1.0) if math.frexp(scale)[0] == 0.5 else (1.0, scale)


def _forward(q, k, v, bias):
    """softmax(q k^T / sqrt(D) + bias) v with the normalisation after the second matmul: p = exp(logits -
    rowmax) unnormalised, out = (p v) / rowsum(p). Dividing the (T, D) output instead of the (T, T) weights
    saves a pass over the weights (~1.7x faster core on XLA:CPU at DiT-S/2's shapes). Returns (out, p, s, qs),
    qs = q with its share of the scale (`_scales`)."""
    q_scale, logit_scale = _scales(q.shape[-1])
    qs = q * jnp.asarray(q_scale, q.dtype) if q_scale != 1.0 else q
    logits = jnp.einsum("bhqd,bhkd->bhqk", qs, k, preferred_element_type=jnp.float32)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    s = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / s
    return out.astype(v.dtype), p, s, qs


def _backward(qs, k, v, p, s, dout):
    """The softmax-attention backward written out from the unnormalised p and its row sums s, w = p / s
    never materialised: with g = dout / s (a (T, D) scaling), dv = p^T g, dw' = g v^T (= dw / s), and
    dlogits = w * (dw - rowsum(dw * w)) = p * (dw' - rowsum(dw' * p) / s). Four batched matmuls and one
    elementwise pass over the (T, T) weights, where autodiff of the forward adds transposes and a second
    pass for the softmax. qs is q scaled as the forward scaled it; dq and dk take the scale where it was.

    dv = p^T g and dk = ds^T qs contract the (T, T) matrix over its rows: a dot with a transposed left
    operand, which XLA:CPU gives to Eigen instead of YNNPACK, 2.5x slower at DiT-S/2's shapes (2.2 against
    0.85 ms a device and layer). So both are computed transposed, dv^T = g^T p and dk^T = qs^T ds, over g^T
    and qs^T copied out ((T, D) each, ~0.1 ms), and transposed back. The barriers keep XLA from folding
    those transposes back into the dot, which it otherwise does. The same sums, so the same values to
    float32 rounding; DiT-S/2's train step 3-8% faster (benchmarks/NOTES.md)."""
    q_scale, logit_scale = _scales(qs.shape[-1])
    g = (dout.astype(jnp.float32) / s).astype(v.dtype)
    dw = jnp.einsum("bhqd,bhkd->bhqk", g, v, preferred_element_type=jnp.float32)
    dlogits = p * (dw - jnp.sum(dw * p, axis=-1, keepdims=True) / s)
    ds = (dlogits * logit_scale if logit_scale != 1.0 else dlogits).astype(qs.dtype)
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k)
    if q_scale != 1.0:
        dq = dq * jnp.asarray(q_scale, dq.dtype)
    dv = _rows_product(g, p.astype(v.dtype))
    dk = _rows_product(qs, ds)
    return dq, dk, dv, dlogits


def _rows_product(a, m):
    """m^T a for m (B, H, T, T) and a (B, H, T, D), as (a^T m)^T with a^T materialised (see _backward)."""
    a_t = lax.optimization_barrier(jnp.swapaxes(a, -1, -2))
    return jnp.swapaxes(lax.optimization_barrier(jnp.einsum("bhdq,bhqk->bhdk", a_t, m)), -1, -2)


@jax.custom_vjp
def _core(q, k, v):
    return _forward(q, k, v, None)[0]


def _core_fwd(q, k, v):
    out, p, s, qs = _forward(q, k, v, None)
    return out, (qs, k, v, p, s)


def _core_bwd(res, dout):
    return _backward(*res, dout)[:3]


_core.defvjp(_core_fwd, _core_bwd)


@jax.custom_vjp
def _core_bias(q, k, v, bias):
    return _forward(q, k, v, bias)[0]


def _core_bias_fwd(q, k, v, bias):
    out, p, s, qs = _forward(q, k, v, bias)
    return out, (qs, k, v, p, s, bias)


def _core_bias_bwd(res, dout):
    qs, k, v, p, s, bias = res
    dq, dk, dv, dlogits = _backward(qs, k, v, p, s, dout)
    return dq, dk, dv, jnp.sum(dlogits, axis=0).astype(bias.dtype)


_core_bias.defvjp(_core_bias_fwd, _core_bias_bwd)


@jax.custom_vjp
def split_heads(qkv):
    """(B, T, 3, H, D) -> q, k, v, each (B, H, T, D): one transposing copy each."""
    return tuple(qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))


def _split_heads_fwd(qkv):
    return split_heads(qkv), None


def _split_heads_bwd(_, grads):
    """dq, dk, dv back into one (B, T, 3, H, D) array in a single pass (a stack and a transpose, which XLA
    fuses), where autodiff of the slices pads each of dq, dk, dv to the full size and adds the three."""
    return (jnp.stack(grads).transpose(1, 3, 0, 2, 4),)


split_heads.defvjp(_split_heads_fwd, _split_heads_bwd)


def attention_core(q, k, v, bias=None):
    """Heads-major core: q, k, v (B, H, T, D), bias (H, T, T) or None -> (B, H, T, D).
    Logits and softmax in float32 (as jax.nn.dot_product_attention does), normalised after the second
    matmul, with a hand-written backward (custom VJP; training's forward and sampling's are the same ops,
    so the same bytes)."""
    return _core(q, k, v) if bias is None else _core_bias(q, k, v, bias)


def self_attention(x, qkv_kernel, qkv_bias, proj_kernel, proj_bias, num_heads, qkv_add=None, bias=None,
                   impl: str | None = None):
    """x (B, T, C) -> (B, T, C).

    qkv_kernel (C, 3C), qkv_bias (3C,) or None, proj_kernel (C, C), proj_bias (C,): a timm Attention's
    weights (already in the compute dtype). qkv_add (B, 3C) or None is added to every token's qkv (DiffiT's
    time token); bias (H, T, T) or None is added to the attention logits.
    """
    impl = impl or attention_impl()
    b, t, c = x.shape
    h, d = num_heads, c // num_heads
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r}: choose one of {IMPLS}")
    # (named scopes only label the HLO ops, for benchmarks/bench_train_step.py --profile)
    with jax.named_scope("qkv"):
        qkv = matmul(x, qkv_kernel)
        if qkv_bias is not None:
            qkv = qkv + qkv_bias
        if qkv_add is not None:
            qkv = qkv + qkv_add[:, None]
        qkv = qkv.reshape(b, t, 3, h, d)  # already dot_product_attention's layout
    if impl == "cudnn" and qkv.dtype not in (jnp.bfloat16, jnp.float16):
        impl = "fused"  # cuDNN's kernel takes half precision only
    with jax.named_scope("attention_core"):
        if impl in ("fused", "cudnn"):
            out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                               bias=None if bias is None else bias[None].astype(qkv.dtype),
                                               implementation="cudnn" if impl == "cudnn" else None)
        else:  # heads-major: q, k, v (B, H, T, D) in, (B, H, T, D) out, back to (B, T, H, D)
            out = attention_core(*split_heads(qkv), bias).transpose(0, 2, 1, 3)
    with jax.named_scope("proj"):
        return matmul(out.reshape(b, t, c), proj_kernel) + proj_bias
