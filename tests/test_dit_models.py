"""DiT model: shapes, init semantics, label dropout, CFG, config validation. Tiny configs, CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit.models import (BLOCKS, MODEL_NAMES, DiT, DiTBlock, LabelEmbedder, check_labels, dit_config,
                        get_2d_sincos_pos_embed, init_params, param_shapes, frozen_param_count)


def tiny(**kw):
    base = dict(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=4, num_classes=10)
    return dit_config(**{**base, **kw})


@functools.lru_cache(maxsize=None)
def fresh(cfg):
    """Init once per config (compiles are the slow part of these tests on 2 cores)."""
    return init_params(cfg, jax.random.key(0))


@functools.lru_cache(maxsize=None)
def fwd(cfg):
    return jax.jit(DiT(cfg).apply)


def perturb(params, seed, scale=0.05):
    """Random non-zero params so zero-initialised layers do not hide bugs (numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda l: jnp.asarray(l + scale * rng.normal(size=l.shape), jnp.float32), params)


def inputs(cfg, n=4, seed=1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, cfg.input_size, cfg.input_size, cfg.in_channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, n), jnp.int32)
    y = jnp.asarray(rng.integers(0, cfg.num_classes, n), jnp.int32)
    return x, t, y


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS)
def test_shapes_every_block(block):
    cfg = tiny(block=block)
    params = perturb(fresh(cfg), 1)
    x, t, y = inputs(cfg)
    out = fwd(cfg)({"params": params}, x, t, y)
    assert out.shape == (4, 8, 8, 8) and out.dtype == jnp.float32
    assert bool(jnp.isfinite(out).all())
    # float timesteps are accepted too (fractional t)
    out_f = fwd(cfg)({"params": params}, x, t.astype(jnp.float32), y)
    np.testing.assert_allclose(out, out_f, atol=1e-5)


def test_learn_sigma_false_and_patch4():
    cfg = tiny(learn_sigma=False, patch_size=4)
    out = fwd(cfg)({"params": fresh(cfg)}, *inputs(cfg, n=2))
    assert out.shape == (2, 8, 8, 4)


@pytest.mark.slow
def test_adaln_zero_blocks_are_identity_at_init_and_output_is_zero():
    cfg = tiny()
    params = fresh(cfg)
    x, t, y = inputs(cfg)
    h = jax.random.normal(jax.random.key(3), (4, cfg.num_patches, cfg.hidden_size))
    c = jax.random.normal(jax.random.key(4), (4, cfg.hidden_size))
    out = DiTBlock(cfg).apply({"params": params["blocks_0"]}, h, c)
    np.testing.assert_array_equal(out, h)
    np.testing.assert_array_equal(fwd(cfg)({"params": params}, x, t, y), 0.0)
    # plain adaLN is not zero-initialised: its block is not the identity
    p2 = fresh(tiny(block="adaln"))
    assert float(jnp.abs(p2["blocks_0"]["adaLN_modulation"]["kernel"]).max()) > 0
    assert p2["blocks_0"]["adaLN_modulation"]["kernel"].shape == (32, 4 * 32)


def test_init_statistics_follow_official():
    p = fresh(tiny())
    qkv = p["blocks_0"]["attn"]["qkv"]["kernel"]  # xavier on (D, 3D)
    bound = np.sqrt(6 / (32 + 96))
    assert float(jnp.abs(qkv).max()) <= bound and float(jnp.abs(qkv).max()) > 0.9 * bound
    np.testing.assert_array_equal(p["blocks_0"]["attn"]["qkv"]["bias"], 0)
    k = p["x_embedder"]["kernel"]  # xavier as a (p*p*C, D) linear
    bound = np.sqrt(6 / (2 * 2 * 4 + 32))
    assert k.shape == (2, 2, 4, 32) and float(jnp.abs(k).max()) <= bound
    assert abs(float(p["t_embedder"]["fc1"]["kernel"].std()) - 0.02) < 0.002
    assert abs(float(p["y_embedder"]["embedding_table"].std()) - 0.02) < 0.004
    assert p["y_embedder"]["embedding_table"].shape == (11, 32)  # + null row
    for name in ("adaLN_modulation", "linear"):
        np.testing.assert_array_equal(p["final_layer"][name]["kernel"], 0)
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(p))


def test_label_dropout():
    cfg = tiny(class_dropout_prob=0.5)
    emb = LabelEmbedder(cfg)
    p = emb.init(jax.random.key(0), jnp.zeros((1,), jnp.int32))
    y = jnp.arange(1000) % 10
    table = p["params"]["embedding_table"]
    eval_out = emb.apply(p, y)
    np.testing.assert_array_equal(eval_out, table[y])  # no dropout outside train
    out = emb.apply(p, y, train=True, rngs={"dropout": jax.random.key(5)})
    dropped = np.all(np.asarray(out) == np.asarray(table[10]), axis=-1)
    assert 400 < dropped.sum() < 600
    kept = ~dropped
    np.testing.assert_array_equal(np.asarray(out)[kept], np.asarray(table[y])[kept])
    again = emb.apply(p, y, train=True, rngs={"dropout": jax.random.key(5)})
    np.testing.assert_array_equal(out, again)
    # the full model needs a dropout rng in train mode only
    cfg = tiny()
    train_fwd = jax.jit(lambda p, k, *a: DiT(cfg).apply({"params": p}, *a, train=True, rngs={"dropout": k}))
    assert train_fwd(fresh(cfg), jax.random.key(1), *inputs(cfg)).shape == (4, 8, 8, 8)
    with pytest.raises(Exception):
        jax.eval_shape(lambda p: DiT(cfg).apply({"params": p}, *inputs(cfg), train=True), fresh(cfg))
    # without dropout there is no null row
    assert param_shapes(tiny(class_dropout_prob=0.0))["y_embedder"]["embedding_table"].shape[0] == 10


@pytest.mark.parametrize("guided", [3, None])
def test_forward_with_cfg(guided):
    cfg = tiny()
    params = perturb(fresh(cfg), 2)
    model = DiT(cfg)
    x, t, y = inputs(cfg, n=4)
    y = y.at[2:].set(cfg.num_classes)  # second half: null label
    scale = 4.0
    with_cfg = jax.jit(lambda p, s, *a: model.apply({"params": p}, *a, s, guided, method=DiT.forward_with_cfg))
    out = with_cfg(params, scale, x, t, y)
    assert out.shape == (4, 8, 8, 8)
    # compose from plain forwards: both halves see the FIRST half of x
    xx = jnp.concatenate([x[:2], x[:2]])
    raw = fwd(cfg)({"params": params}, xx, t, y)
    k = 4 if guided is None else guided
    cond, uncond = raw[:2, ..., :k], raw[2:, ..., :k]
    guided_eps = uncond + scale * (cond - uncond)
    np.testing.assert_allclose(out[:2, ..., :k], guided_eps, atol=1e-5)
    np.testing.assert_allclose(out[2:, ..., :k], guided_eps, atol=1e-5)
    np.testing.assert_allclose(out[..., k:], raw[..., k:], atol=1e-6)
    # scale 1 is the conditional prediction
    out1 = with_cfg(params, 1.0, x, t, y)
    np.testing.assert_allclose(out1[:2, ..., :k], cond, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
    cfg = tiny(dtype="bfloat16")
    params = perturb(fresh(tiny()), 2)  # same shapes; dtype only changes compute
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(params))
    x, t, y = inputs(cfg)
    out = fwd(cfg)({"params": params}, x, t, y)
    ref = fwd(tiny())({"params": params}, x, t, y)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max()) + 1e-3


def test_configs_and_bad_input():
    assert len(MODEL_NAMES) == 12
    xl = dit_config("DiT-XL/2")
    assert (xl.depth, xl.hidden_size, xl.num_heads, xl.patch_size) == (28, 1152, 16, 2)
    assert dit_config("DiT-S/8", input_size=64).grid_size == 8
    with pytest.raises(ValueError, match="DiT-M/2"):
        dit_config("DiT-M/2")
    with pytest.raises(ValueError, match="patch_size"):
        dit_config("DiT-S/8", input_size=12)
    with pytest.raises(ValueError, match="bogus"):
        dit_config(bogus=1)
    with pytest.raises(ValueError, match="block"):
        tiny(block="unet")
    cfg = tiny()
    check_labels(np.array([0, 9, 10]), cfg)  # 10 is the null label
    with pytest.raises(ValueError, match="labels"):
        check_labels(np.array([11]), cfg)
    with pytest.raises(ValueError, match="labels"):
        check_labels(np.array([-1]), cfg)
    params = fresh(cfg)
    x, t, y = inputs(cfg, n=2)
    with pytest.raises(ValueError, match="labels"):
        DiT(cfg).apply({"params": params}, x, t, jnp.array([3, 12]))
    with pytest.raises(ValueError, match="NHWC"):
        DiT(cfg).apply({"params": params}, jnp.zeros((2, 4, 8, 8)), t, y)


def test_pos_embed_ordering_and_param_count():
    pe = get_2d_sincos_pos_embed(8, 3)
    # token index = row * g + col; first half of channels encodes the COLUMN (official ordering)
    col, row = 2, 1
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    np.testing.assert_allclose(pe[row * 3 + col, :4], np.concatenate([np.sin(col * omega), np.cos(col * omega)]))
    np.testing.assert_allclose(pe[row * 3 + col, 4:], np.concatenate([np.sin(row * omega), np.cos(row * omega)]))
    xl = dit_config("DiT-XL/2")
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(param_shapes(xl)))
    assert frozen_param_count(xl) == 294_912
    assert n + frozen_param_count(xl) == 675_129_632


def test_tmsa_attention_matches_formula():
    """DiffiT TMSA: q = x Wqs + t Wqt (same for k, v), softmax(q k^T / sqrt(d) + B_rel) v."""
    from dit.models import Attention, relative_position_index

    n, g, d, heads = 2, 3, 8, 2
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, g * g, d)), jnp.float32)
    tok = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    table = rng.standard_normal(((2 * g - 1) ** 2, heads)).astype(np.float32)
    idx = relative_position_index(g)
    bias = table[idx].transpose(2, 0, 1)
    attn = Attention(heads)
    p = attn.init(jax.random.key(0), x, tok, jnp.asarray(bias))
    p = perturb(p, 3, scale=0.3)
    out = np.asarray(attn.apply(p, x, tok, jnp.asarray(bias)))
    w = jax.tree.map(np.asarray, p["params"])
    qkv = np.asarray(x) @ w["qkv"]["kernel"] + w["qkv"]["bias"] + (np.asarray(tok) @ w["qkv_time"]["kernel"])[:, None]
    q, k, v = np.split(qkv.reshape(n, g * g, 3, heads, d // heads), 3, axis=2)
    q, k, v = (a[:, :, 0].transpose(0, 2, 1, 3) for a in (q, k, v))  # (n, heads, T, hd)
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads) + bias[None]
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    o = (prob @ v).transpose(0, 2, 1, 3).reshape(n, g * g, d)
    np.testing.assert_allclose(out, o @ w["proj"]["kernel"] + w["proj"]["bias"], rtol=1e-4, atol=1e-5)
    # relative index: equal displacements share an entry, the diagonal is the centre of the table
    assert idx.shape == (9, 9) and set(np.diag(idx)) == {(2 * g - 1) * (g - 1) + g - 1}
    assert idx[0, 4] == idx[4, 8]  # (0,0)->(1,1) and (1,1)->(2,2)


@pytest.mark.parametrize("with_extras", [False, True])
def test_attention_formulations_agree(with_extras):
    """The per-backend choice (dit/attention.py) gives the reference outputs and gradients on CPU:
    the heads-major formulation vs jax.nn.dot_product_attention, with and without the time token
    and the logit bias (tmsa)."""
    from dit.attention import attention_impl, self_attention

    assert attention_impl("cpu") == "heads" and attention_impl("gpu") == "cudnn" and attention_impl("tpu") == "fused"
    rng = np.random.default_rng(0)
    b, t, c, h = 2, 16, 32, 4
    arr = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    x, wqkv, bqkv, wp, bp = arr(b, t, c), arr(c, 3 * c) / 4, arr(3 * c), arr(c, c) / 4, arr(c)
    extra = dict(qkv_add=arr(b, 3 * c), bias=arr(h, t, t)) if with_extras else {}

    @functools.partial(jax.jit, static_argnums=0)
    def run(impl):
        f = lambda x, wqkv, wp: jnp.sum(jnp.sin(self_attention(x, wqkv, bqkv, wp, bp, h, impl=impl, **extra)))
        out = self_attention(x, wqkv, bqkv, wp, bp, h, impl=impl, **extra)
        return out, jax.grad(f, argnums=(0, 1, 2))(x, wqkv, wp)

    (ref, gref), (got, ggot) = run("fused"), run("heads")
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(ggot, gref):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("with_extras", [False, True])
def test_attention_cudnn_matches_heads_on_gpu(with_extras):
    """On a GPU, the choice there (cuDNN's kernel, bfloat16) against the heads-major formulation in float32:
    outputs and gradients to bfloat16's precision, with and without the time token and the logit bias."""
    from dit.attention import attention_impl, self_attention

    assert attention_impl() == "cudnn"
    rng = np.random.default_rng(0)
    b, t, c, h = 4, 256, 1152, 16  # DiT-XL/2's tokens and heads (head dim 72)
    arr = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    x, wqkv, bqkv, wp, bp = arr(b, t, c), arr(c, 3 * c) / c ** 0.5, arr(3 * c), arr(c, c) / c ** 0.5, arr(c)
    extra = dict(qkv_add=arr(b, 3 * c), bias=arr(h, t, t)) if with_extras else {}

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(impl, dtype, x, wqkv, bqkv, wp, bp, extra):  # arrays as arguments: XLA would fold constants
        cast = lambda a: a.astype(dtype)
        ex = {k: cast(v) for k, v in extra.items()}
        f = lambda x, wqkv, wp: self_attention(cast(x), cast(wqkv), cast(bqkv), cast(wp), cast(bp), h, impl=impl,
                                               **ex).astype(jnp.float32)
        out, vjp = jax.vjp(f, x, wqkv, wp)
        return out, vjp(jnp.cos(out))

    args = (x, wqkv, bqkv, wp, bp, extra)
    (ref, gref), (got, ggot) = run("heads", jnp.float32, *args), run("cudnn", jnp.bfloat16, *args)
    (xla, gxla) = run("fused", jnp.bfloat16, *args)  # XLA's own attention in bfloat16: the error to match
    for a, r, z in zip((got, *ggot), (ref, *gref), (xla, *gxla)):
        err, base = float(jnp.abs(a - r).max()), float(jnp.abs(z - r).max())
        assert err <= 2 * base + 1e-6, (err, base)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_core_custom_vjp_matches_autodiff(dtype):
    """The heads-major core (normalised after the second matmul, a hand-written backward) against the
    plain ops and autodiff: the outputs, and the gradients of q, k, v and the (tmsa) logit bias."""
    import math

    from dit.attention import attention_core

    def plain(q, k, v, bias):
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(8)
        w = jax.nn.softmax(logits + bias, axis=-1)
        return jnp.einsum("bhqk,bhkd->bhqd", w.astype(v.dtype), v)

    rng = np.random.default_rng(1)
    q, k, v, g = (jnp.asarray(rng.normal(size=(2, 3, 16, 8)), dtype) for _ in range(4))
    bias = jnp.asarray(rng.normal(size=(3, 16, 16)), jnp.float32)
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    out, ref_out = attention_core(q, k, v, bias), plain(q, k, v, bias)
    assert out.dtype == ref_out.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=tol * 4, rtol=tol)
    loss = lambda f: lambda *a: jnp.sum((f(*a) * g).astype(jnp.float32))
    got = jax.grad(loss(attention_core), argnums=(0, 1, 2, 3))(q, k, v, bias)
    ref = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(q, k, v, bias)
    for a, r in zip(got, ref):
        assert a.dtype == r.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r, np.float32), atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("d", [64, 72])
def test_attention_scale_on_q_is_exact(d, dtype):
    """Where 1/sqrt(D) is a power of two (D = 64) the core puts it on q, elsewhere (D = 72) on the logits.
    Either way the output and the gradients of q, k, v and the logit bias are, to the bit, those of the
    scale on the logits, with the same hand-written backward (scaling by a power of two is exact); dk and
    dv on both sides through the core's own product over the rows of a (T, T) matrix."""
    import math

    from dit.attention import _rows_product, _scales, attention_core

    assert _scales(64) == (0.125, 1.0) and _scales(16) == (0.25, 1.0)
    assert _scales(72) == (1.0, 1 / math.sqrt(72)) and _scales(32) == (1.0, 1 / math.sqrt(32))
    scale = 1.0 / math.sqrt(d)
    rng = np.random.default_rng(3)
    q, k, v, g = (jnp.asarray(rng.normal(size=(2, 3, 16, d)), dtype) for _ in range(4))
    bias = jnp.asarray(rng.normal(size=(3, 16, 16)), jnp.float32)
    # the formulation before the split, written out: scale on the logits, and on dlogits in the backward
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale + bias
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    s = jnp.sum(p, axis=-1, keepdims=True)
    ref_out = (jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / s
               ).astype(dtype)
    gs = (g.astype(jnp.float32) / s).astype(dtype)
    dw = jnp.einsum("bhqd,bhkd->bhqk", gs, v, preferred_element_type=jnp.float32)
    dlogits = p * (dw - jnp.sum(dw * p, axis=-1, keepdims=True) / s)
    ds = (dlogits * scale).astype(dtype)
    ref = (jnp.einsum("bhqk,bhkd->bhqd", ds, k), _rows_product(q, ds), _rows_product(gs, p.astype(dtype)),
           jnp.sum(dlogits, axis=0))
    out, vjp = jax.vjp(attention_core, q, k, v, bias)
    got = vjp(g)
    for a, r in zip((out, *got), (ref_out, *ref)):
        assert a.dtype == r.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(r, np.float32))


def test_attention_core_dots_contract_the_left_operands_last_axis_on_cpu():
    """Every batched matmul of the core, forward and backward, in XLA:CPU's optimized program contracts its
    left operand over its last axis: the form XLA:CPU gives to YNNPACK, not Eigen (dv and dk are computed
    transposed, `_rows_product`). The plain p^T g compiles to a left operand contracted over its rows: the
    check can fail."""
    import re

    from dit.attention import attention_core

    q = jnp.ones((2, 3, 32, 16), jnp.float32)
    dots = re.compile(r" dot\(%[^)]*\), lhs_batch_dims=\{0,1\}, lhs_contracting_dims=\{(\d)\}")
    hlo = lambda f, *a: jax.jit(f, backend="cpu").lower(*a).compile().as_text()
    plain = dots.findall(hlo(lambda m, g: jnp.einsum("bhqk,bhqd->bhkd", m, g), jnp.ones((2, 3, 32, 32)), q))
    assert plain == ["2"]
    found = dots.findall(hlo(jax.grad(lambda q, k, v: jnp.sum(attention_core(q, k, v) ** 2), argnums=(0, 1, 2)),
                             q, q, q))
    assert len(found) == 6 and set(found) == {"3"}, found


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_split_heads_custom_vjp_is_exact(dtype):
    """split_heads' one-pass backward gives autodiff's qkv gradient bit for bit (it only moves values)."""
    from dit.attention import split_heads

    plain = lambda qkv: tuple(qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    rng = np.random.default_rng(2)
    qkv = jnp.asarray(rng.normal(size=(2, 5, 3, 4, 8)), dtype)
    grads = tuple(jnp.asarray(rng.normal(size=(2, 4, 5, 8)), dtype) for _ in range(3))
    (out, vjp), (ref, ref_vjp) = jax.vjp(split_heads, qkv), jax.vjp(plain, qkv)
    for a, r in zip(out, ref):
        assert a.dtype == r.dtype and a.shape == r.shape == (2, 4, 5, 8)
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(r, np.float32))
    (got,), (want,) = vjp(grads), ref_vjp(grads)
    assert got.dtype == want.dtype and got.shape == qkv.shape
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_gelu_custom_vjp_matches_autodiff():
    from dit.models import gelu_tanh

    x = jnp.linspace(-8.0, 8.0, 4001)
    ref = lambda x: jnp.sum(jnp.cos(jax.nn.gelu(x, approximate=True)))
    got = lambda x: jnp.sum(jnp.cos(gelu_tanh(x)))
    np.testing.assert_array_equal(gelu_tanh(x), jax.nn.gelu(x, approximate=True))
    np.testing.assert_allclose(jax.grad(got)(x), jax.grad(ref)(x), rtol=1e-5, atol=1e-6)
