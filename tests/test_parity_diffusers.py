"""Parity with diffusers' PyTorch DiTTransformer2DModel from one random official-format state dict.

Every tensor is random (the zero-initialised adaLN and final layers included), so a wrong
transpose, split or ordering anywhere shows. diffusers deviates from the official DiT in one place:
its timestep sinusoid divides the frequency exponent by (half - 1) (`downscale_freq_shift=1`) where
facebookresearch/DiT divides by half; we pin diffusers' to the official value for the comparison.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dit import convert  # noqa: E402
from dit.models import DiT, dit_config  # noqa: E402


def random_official_state_dict(cfg, seed=0):
    """Random weights, scaled like a trained net (1/sqrt(fan_in)), non-zero everywhere."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed as diffusers_pos_embed

    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in convert._expected_shapes(cfg).items():
        if key == "pos_embed":
            continue
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = 0.05 if len(shape) == 1 else 1.0 / np.sqrt(fan_in)
        if "adaLN_modulation" in key:
            scale *= 0.5  # keep (1 + scale) modulation in a sane range
        sd[key] = (scale * rng.standard_normal(shape)).astype(np.float32)
    # diffusers' own pos-embed code: an independent check of our (official) ordering
    # (base_size = grid_size is what its PatchEmbed passes: positions 0..g-1)
    pos = diffusers_pos_embed(cfg.hidden_size, cfg.grid_size, base_size=cfg.grid_size)
    sd["pos_embed"] = pos.float().numpy()[None]
    return sd


def diffusers_model(cfg, sd):
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        sample_size=cfg.input_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes,
        norm_eps=1e-6)  # the official blocks use eps 1e-6 (diffusers' default is 1e-5)
    dsd = convert.official_to_diffusers(sd, cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in dsd.items()}, strict=True)
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # official frequencies (see module doc)
    return model.eval()


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.slow
@pytest.mark.parametrize("name,latent", [("DiT-S/2", 8), ("DiT-B/4", 16)])
def test_parity_with_diffusers(name, latent):
    cfg = dit_config(name, input_size=latent)
    sd = random_official_state_dict(cfg)
    params = convert.official_to_params(sd, cfg)
    peer = diffusers_model(cfg, sd)

    rng = np.random.default_rng(1)
    n = 4
    x = rng.standard_normal((n, latent, latent, 4)).astype(np.float32)
    t = np.array([0, 17, 500, 999], np.int64)
    y = np.array([3, 999, 1000, 42], np.int64)  # 1000 = the null label
    model = DiT(cfg)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
    with torch.no_grad():
        theirs = peer(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(y)).sample
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    assert np.abs(theirs).max() > 0.1
    assert rel_err(ours, theirs) < 1e-4

    # Classifier-free guidance: diffusers has no forward_with_cfg, so compose it as the official code.
    scale = 4.0
    y_cfg = np.array([3, 42, 1000, 1000], np.int64)
    half = np.concatenate([x[:2], x[:2]])
    with torch.no_grad():
        out = peer(torch.from_numpy(half.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(y_cfg)).sample
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    guided = uncond + scale * (cond - uncond)
    theirs_cfg = torch.cat([torch.cat([guided, guided], 0), rest], 1).numpy().transpose(0, 2, 3, 1)
    with_cfg = jax.jit(lambda p, *a: model.apply({"params": p}, *a, scale, 3, method=DiT.forward_with_cfg))
    ours_cfg = np.asarray(with_cfg(params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y_cfg)))
    assert rel_err(ours_cfg, theirs_cfg) < 1e-4

    # round trip back to the official layout is exact
    back = convert.params_to_official(params, cfg)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_allclose(back[k], sd[k], atol=1e-6, err_msg=k)


def test_converter_rejects_bad_state_dicts():
    cfg = dit_config(input_size=8, patch_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    sd = random_official_state_dict(cfg)
    bad = dict(sd)
    del bad["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2\.bias"):
        convert.official_to_params(bad, cfg)
    bad = dict(sd, **{"blocks.2.attn.qkv.weight": sd["blocks.1.attn.qkv.weight"]})
    with pytest.raises(ValueError, match=r"blocks\.2\.attn\.qkv\.weight"):
        convert.official_to_params(bad, cfg)
    bad = dict(sd, **{"final_layer.linear.weight": np.zeros((5, 32), np.float32)})
    with pytest.raises(ValueError, match=r"final_layer\.linear\.weight"):
        convert.official_to_params(bad, cfg)
    bad = dict(sd, **{"t_embedder.mlp.0.bias": np.full(32, np.nan, np.float32)})
    with pytest.raises(ValueError, match=r"t_embedder\.mlp\.0\.bias"):
        convert.official_to_params(bad, cfg)
    bad = dict(sd, pos_embed=sd["pos_embed"][:, ::-1].copy())
    with pytest.raises(ValueError, match="pos_embed"):
        convert.official_to_params(bad, cfg)
    with pytest.raises(ValueError, match="adaLN-Zero"):
        convert.official_rules(dit_config("DiT-S/2", block="cross_attn"))


def test_cli_roundtrip(tmp_path):
    cfg = dit_config("DiT-S/8", input_size=8)
    sd = random_official_state_dict(cfg, seed=3)
    src = tmp_path / "dit.pt"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, src)
    dst = tmp_path / "dit.msgpack"
    assert convert.main([str(src), str(dst), "--model", "DiT-S/8", "--image-size", "64"]) == 0
    params = convert.load_params(str(dst), cfg)
    ref = convert.official_to_params(sd, cfg)
    for (pa, a), (pb, b) in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(ref)):
        assert pa == pb
        np.testing.assert_array_equal(a, b)
    # wrong model for the weights: a non-zero exit naming the offending key
    assert convert.main([str(src), str(dst), "--model", "DiT-B/8", "--image-size", "64"]) == 2
    assert convert.main([str(tmp_path / "nope.pt"), str(dst)]) == 2
    with pytest.raises(ValueError, match="missing param"):
        convert.load_params(str(dst), dit_config("DiT-S/8", input_size=8, depth=13))
