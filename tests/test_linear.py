"""dit.linear: the linear layers' matmul with a hand-written backward on CPU. The same forward to the bit,
the same gradients as autodiff's to float32 rounding, and a weight gradient that XLA:CPU computes in the
kernel's own (in, out) layout, with no transpose after the GEMM."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit.linear import dense_dot_general, linear_impl, matmul
from dit.models import DiT, dit_config, init_params


def _grads(impl, x, w, c):
    return jax.grad(lambda x, w: jnp.sum(matmul(x, w, impl=impl) * c), argnums=(0, 1))(x, w)


@pytest.mark.parametrize("lead,din,dout", [((64,), 24, 40), ((4, 16), 24, 40), ((2, 3, 8), 24, 40),
                                            ((4, 128), 96, 40), ((512,), 40, 24)])  # narrowing: (g^T x)^T
def test_same_forward_and_gradients_as_autodiff(lead, din, dout):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((*lead, din)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((din, dout)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((*lead, dout)), jnp.float32)
    assert np.array_equal(matmul(x, w, impl="vjp"), matmul(x, w, impl="autodiff"))
    assert np.array_equal(matmul(x, w, impl="vjp"), x @ w)
    atol = 1e-5 * max(1.0, np.sqrt(np.prod(lead) / 64))  # float32 rounding of sums over the rows
    for got, want in zip(_grads("vjp", x, w, c), _grads("autodiff", x, w, c)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


def test_bfloat16_gradients_keep_their_dtype():
    x = jnp.ones((8, 16), jnp.bfloat16)
    w = jnp.ones((16, 4), jnp.bfloat16)
    dx, dw = _grads("vjp", x, w, jnp.ones((8, 4), jnp.bfloat16))
    assert dx.dtype == dw.dtype == jnp.bfloat16 and float(dw[0, 0]) == 8.0


def _step_hlo(impl, din, dout):
    x = jnp.ones((4, 256, din), jnp.float32)
    w = jnp.ones((din, dout), jnp.float32)
    c = jnp.ones((4, 256, dout), jnp.float32)

    def step(w, x, c):
        g = jax.grad(lambda w: jnp.sum(matmul(x, w, impl=impl) * c))(w)
        return w - 1e-3 * g * g  # an optimizer-like consumer of the gradient
    return jax.jit(step, backend="cpu").lower(w, x, c).compile().as_text()


def test_weight_gradient_has_no_transpose_on_cpu():
    """The point of the custom VJP: in XLA:CPU's optimized program, an update that reads dL/dW reads a GEMM's
    (in, out) output. With autodiff's rule the GEMM writes (out, in) and the update reads it through a
    transpose, which XLA:CPU keeps (in a train step, inside every AdamW update of a kernel)."""
    transpose = re.compile(r" transpose\(%")  # the instruction, not a "transpose(jvp(...))" op name
    assert transpose.search(_step_hlo("autodiff", 384, 1536))  # the check below can fail: autodiff's has one
    assert not transpose.search(_step_hlo("vjp", 384, 1536))


def test_narrowing_layer_computes_the_wide_weight_gradient():
    """A layer with in > out (fc2, 1536 -> 384): Eigen writes the wide (out, in) product faster than the tall
    (in, out) one, so the custom VJP computes g^T x, (384, 1536), and transposes the param-sized result."""
    dots = re.findall(r"= f32\[(\d+),(\d+)\]\S* dot\(", _step_hlo("vjp", 1536, 384))
    assert dots == [("384", "1536")]
    dots = re.findall(r"= f32\[(\d+),(\d+)\]\S* dot\(", _step_hlo("vjp", 384, 1536))
    assert dots == [("384", "1536")]  # widening: the (in, out) product, as before


@pytest.mark.slow
def test_model_gradients_match_autodiff(monkeypatch):
    cfg = dit_config(None, input_size=8, depth=2, hidden_size=64, num_heads=4, patch_size=2, num_classes=10,
                     learn_sigma=True)
    model, params = DiT(cfg), init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.key(1), p.shape), params)  # no zero layers
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 4))
    t, y = jnp.arange(4) * 100, jnp.arange(4)

    def grads(impl):
        monkeypatch.setenv("DIT_LINEAR", impl)
        return jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t, y) ** 2))(params)

    assert linear_impl() in ("vjp", "autodiff")
    got, want = grads("vjp"), grads("autodiff")
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_impl_choice():
    assert linear_impl("cpu") == "vjp" and linear_impl("gpu") == linear_impl("tpu") == "autodiff"


def test_impl_override(monkeypatch):
    monkeypatch.setenv("DIT_LINEAR", "autodiff")
    assert linear_impl("cpu") == "autodiff"
    monkeypatch.setenv("DIT_LINEAR", "fast")
    with pytest.raises(ValueError, match="DIT_LINEAR='fast'"):
        linear_impl()


def test_dense_dot_general_passes_other_contractions_through():
    a, b = jnp.ones((3, 5)), jnp.ones((4, 5))
    out = dense_dot_general(a, b, (((1,), (1,)), ((), ())))  # not Dense's contraction: plain dot_general
    assert out.shape == (3, 4) and float(out[0, 0]) == 5.0
