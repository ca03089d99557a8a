"""The linear layers' matmul, x (..., in) @ w (in, out), with the backward chosen per backend HERE only.

Autodiff of x @ w computes the weight gradient as (g^T x)^T: a GEMM that writes (out, in), then a
transpose back to w's (in, out). XLA:CPU does not fold that transpose into the GEMM. It sinks it into the
gradient's consumers instead: the all-reduce carries (out, in) gradients, and every AdamW update of a
kernel reads its gradient across the grain, in a strided loop (DiT-S/2's AdamW: 219-233 CPU-ms a step,
56-81 without the transpose; benchmarks/bench_train_step.py --profile).

  "vjp"       a custom VJP: the weight gradient is one GEMM that writes (in, out), x^T g, over x and g
              flattened to 2-D (with 3-D operands XLA copies x^T out element by element first, which costs
              more than it saves); the input gradient is g w^T, as autodiff writes it. The same products,
              summed over the same axis; the forward is the same dot, so sampling is unchanged to the bit.
              DiT-S/2's train step 4-7% faster on a 2-core Zen 5 EPYC, the embedded default's 7%.
              Layers that narrow (in > out) are the exception: there Eigen's (out, in) product is the
              faster GEMM, so they go back to autodiff's form, fenced (`weight_grad`).
  "autodiff"  jax's own transpose rule. XLA on GPU and TPU assigns layouts to its GEMMs and folds such
              transposes; they keep it.

`linear_impl()` is the one place that picks: "vjp" on CPU, "autodiff" elsewhere; DIT_LINEAR=vjp|autodiff
overrides it (for tests and benchmarks).
"""

from __future__ import annotations

import os

import jax
from jax import lax

IMPLS = ("vjp", "autodiff")


def choose_impl(env: str, impls: tuple[str, ...], by_backend: dict, default: str, backend: str | None) -> str:
    """A per-backend choice: $env if set (one of `impls`), else by_backend[backend] or `default`."""
    forced = os.environ.get(env, "")
    if forced:
        if forced not in impls:
            raise ValueError(f"{env}={forced!r}: choose one of {impls}")
        return forced
    return by_backend.get(backend or jax.default_backend(), default)


def linear_impl(backend: str | None = None) -> str:
    return choose_impl("DIT_LINEAR", IMPLS, {"cpu": "vjp"}, "autodiff", backend)


def _dot(x, w):
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def _matmul_vjp(x, w):
    return _dot(x, w)


def _fwd(x, w):
    return _dot(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    dx = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
    return dx.astype(x.dtype), weight_grad(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])).astype(w.dtype)


def weight_grad(x, g):
    """x^T g for x (M, in), g (M, out): a dot contracting both operands over their rows, which XLA:CPU runs
    on Eigen. Eigen writes a wide output faster than a tall one: (128, 512) in 1.0 ms, (512, 128) in 1.45
    at M = 1024 on a 2-core Zen 4 (DiT-S/2's fc2 at M = 1024: 7.4 against 8.2 ms). So a layer that narrows
    (in > out: the MLP's fc2, the final layer), over enough rows to matter, computes the wide product g^T x
    and hands back its transpose. The barrier keeps XLA from folding that transpose back into the dot; the
    optimizer's fusions then read the param-sized gradient across the grain, which costs far less than the
    GEMM saves (the embedded default's train step 2-3% faster; DiT-S/2's within noise)."""
    if x.shape[1] > g.shape[1] and x.shape[0] >= 256:
        return lax.optimization_barrier(lax.dot_general(g, x, (((0,), (0,)), ((), ())))).T
    return lax.dot_general(x, g, (((0,), (0,)), ((), ())))


_matmul_vjp.defvjp(_fwd, _bwd)


def matmul(x, w, impl: str | None = None):
    """x (..., in) @ w (in, out) -> (..., out)."""
    return _matmul_vjp(x, w) if (impl or linear_impl()) == "vjp" else _dot(x, w)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """flax.linen.Dense's `dot_general` (inputs (..., in), kernel (in, out)), as `matmul`; any other
    contraction, precision or output type goes to lax.dot_general unchanged."""
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or lb or rb or rhs.ndim != 2 \
            or precision is not None or preferred_element_type is not None:
        return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type)
    return matmul(lhs, rhs)
