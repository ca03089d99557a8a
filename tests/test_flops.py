"""Params and Gflops of every config against the paper's appendix table (nothing allocated)."""

import jax
import jax.numpy as jnp
import pytest

from dit.flops import PAPER, PAPER_512, count_flops, count_macs, count_params
from dit.models import MODEL_NAMES, dit_config, frozen_param_count


def test_count_macs_counts_dots_and_convs():
    f = lambda a, b: a @ b
    assert count_macs(jax.make_jaxpr(f)(jnp.zeros((3, 5)), jnp.zeros((5, 7)))) == 3 * 5 * 7
    g = lambda q, k: jnp.einsum("bthd,bshd->bhts", q, k)
    assert count_macs(jax.make_jaxpr(g)(jnp.zeros((2, 4, 3, 8)), jnp.zeros((2, 6, 3, 8)))) == 2 * 3 * 4 * 6 * 8
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert count_macs(jax.make_jaxpr(conv)(jnp.zeros((1, 8, 8, 4)), jnp.zeros((2, 2, 4, 16)))) == 16 * 16 * (2 * 2 * 4)
    nested = jax.jit(lambda a, b: jnp.tanh(a @ b))
    assert count_macs(jax.make_jaxpr(lambda a, b: nested(a, b) @ b.T)(jnp.zeros((3, 5)), jnp.zeros((5, 5)))) == 150


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_params_and_gflops_match_paper(name):
    cfg = dit_config(name)
    paper_m, paper_g = PAPER[name]
    # the paper's column counts trainable params (without the frozen pos-embed buffer)
    assert abs(count_params(cfg, include_frozen=False) - paper_m * 1e6) < 0.5e6
    assert abs(count_flops(cfg) / 1e9 / paper_g - 1) < 0.01


def test_xl2_exact_params_and_512_gflops():
    xl = dit_config("DiT-XL/2")
    assert count_params(xl) == 675_129_632
    assert frozen_param_count(xl) == 294_912
    name, latent, _, paper_g = PAPER_512
    assert abs(count_flops(dit_config(name, input_size=latent)) / 1e9 / paper_g - 1) < 0.01


@pytest.mark.slow
def test_block_designs_match_paper():
    # Table 4: XL/2 in-context 449M / 119.37, cross-attention 598M / 137.62, adaLN 600M / 118.56
    for block, m, g in [("in_context", 449, 119.37), ("cross_attn", 598, 137.62), ("adaln", 600, 118.56)]:
        cfg = dit_config("DiT-XL/2", block=block)
        assert abs(count_params(cfg, include_frozen=False) / 1e6 - m) < 1.0, block
        assert abs(count_flops(cfg) / 1e9 / g - 1) < 0.01, block
