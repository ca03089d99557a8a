"""The Flax AutoencoderKL against diffusers' (random weights, converted), its files, and the vae stage."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from conftest import ROOT, run_stage
from dit import vae as vae_lib
from dit.vae import AutoencoderKL, VAEConfig


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def torch_vae(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention=True):
    n = len(block_out_channels)
    torch.manual_seed(0)
    model = TorchAutoencoderKL(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                               norm_num_groups=norm_num_groups, mid_block_add_attention=attention,
                               down_block_types=("DownEncoderBlock2D",) * n,
                               up_block_types=("UpDecoderBlock2D",) * n).eval()
    with torch.no_grad():  # GroupNorms start at scale 1, bias 0: perturb so a swapped mapping shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def state_dict_np(model) -> dict:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def torch_outputs(model, x_nhwc: np.ndarray):
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).latent_dist
        recon = model.decode(dist.mean).sample
    to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    return to_nhwc(dist.mean), to_nhwc(dist.logvar), to_nhwc(recon)


def flax_outputs(config, params, x_nhwc, z_nhwc):
    model, variables = AutoencoderKL(config), {"params": params}
    mean, logvar = model.apply(variables, x_nhwc, method=AutoencoderKL.encode)
    recon = model.apply(variables, z_nhwc, method=AutoencoderKL.decode)
    return mean, logvar, recon


def images(n=2, size=16, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("block_out_channels,layers_per_block,groups,attention", [
    ((32, 64), 1, 8, True),
    ((32, 64), 1, 16, False),
    ((32, 64, 64), 2, 32, True),
])
@pytest.mark.slow
def test_parity_with_diffusers(block_out_channels, layers_per_block, groups, attention):
    tm = torch_vae(block_out_channels, layers_per_block, groups, attention)
    config = VAEConfig.from_diffusers(dict(tm.config))
    assert config.block_out_channels == block_out_channels and config.mid_block_attention == attention
    params = vae_lib.convert_diffusers_state_dict(state_dict_np(tm), config)
    x = images()
    t_mean, t_logvar, t_recon = torch_outputs(tm, x)
    mean, logvar, recon = flax_outputs(config, params, x, t_mean)
    assert mean.shape == (2, 16 // config.downsample_factor, 16 // config.downsample_factor, 4)
    assert rel_err(mean, t_mean) < 1e-4
    assert rel_err(logvar, t_logvar) < 1e-4
    assert rel_err(recon, t_recon) < 1e-4


def test_deprecated_attention_names_convert_the_same():
    # sd-vae-ft-ema's safetensors still use query/key/value/proj_attn, as 1x1 convs in LDM checkpoints.
    tm = torch_vae()
    config = VAEConfig.from_diffusers(dict(tm.config))
    new = state_dict_np(tm)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in new.items():
        for a, b in old_names.items():
            if f".attentions.0.{a}." in k:
                k, v = k.replace(f".{a}.", f".{b}."), (v[:, :, None, None] if v.ndim == 2 else v)
        old[k] = v
    a = vae_lib.convert_diffusers_state_dict(new, config)
    b = vae_lib.convert_diffusers_state_dict(old, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_bad_state_dicts_name_the_key():
    tm = torch_vae()
    config = VAEConfig.from_diffusers(dict(tm.config))
    sd = state_dict_np(tm)
    missing = dict(sd)
    del missing["decoder.conv_out.bias"]
    with pytest.raises(ValueError, match=r"missing key.*decoder\.conv_out\.bias"):
        vae_lib.convert_diffusers_state_dict(missing, config)
    with pytest.raises(ValueError, match=r"unexpected key.*encoder\.extra\.weight"):
        vae_lib.convert_diffusers_state_dict({**sd, "encoder.extra.weight": np.zeros(3)}, config)
    wrong = {**sd, "quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"quant_conv\.weight"):
        vae_lib.convert_diffusers_state_dict(wrong, config)


def test_from_diffusers_refuses_other_variants():
    base = dict(torch_vae().config)
    for key, value in [("act_fn", "gelu"), ("use_quant_conv", False), ("shift_factor", 0.1159)]:
        with pytest.raises(ValueError, match=key):
            VAEConfig.from_diffusers({**base, key: value})
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig(block_out_channels=(32, 48), norm_num_groups=32)


def test_init_params_fit_the_model_and_are_deterministic():
    config = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    a = vae_lib.init_params(config, jax.random.key(0))
    b = vae_lib.init_params(config, jax.random.key(0))
    vae_lib.check_params(a, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    bound = 1 / np.sqrt(3 * 3 * 3)  # torch's default for conv_in: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    kernel = a["encoder"]["conv_in"]["kernel"]
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
    assert (a["decoder"]["conv_norm_out"]["scale"] == 1).all()


def test_vae_loss_terms():
    x = images()
    mean = np.zeros((2, 4, 4, 4), np.float32)
    loss, aux = vae_lib.vae_loss(x, x, mean, mean, kl_weight=0.5)  # perfect recon, posterior = prior
    assert float(loss) == 0.0 and float(aux["kl"]) == 0.0
    loss, aux = vae_lib.vae_loss(x + 0.1, x, mean + 1.0, mean, kl_weight=0.5)
    np.testing.assert_allclose(float(aux["recon"]), 0.01, rtol=1e-5)
    np.testing.assert_allclose(float(aux["kl"]), 0.5, rtol=1e-6)  # 0.5 * mu^2 per entry
    np.testing.assert_allclose(float(loss), 0.01 + 0.25, rtol=1e-5)
    _, aux = vae_lib.vae_loss(x + 0.1, x, mean, mean, kl_weight=0.0, recon_loss="l1")
    np.testing.assert_allclose(float(aux["recon"]), 0.1, rtol=1e-5)


def test_save_load_round_trip(tmp_path):
    config = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       scaling_factor=0.4321, mid_block_attention=False)
    params = vae_lib.init_params(config, jax.random.key(3))
    vae_lib.save(tmp_path / "vae", config, params)
    assert json.loads((tmp_path / "vae/config.json").read_text())["scaling_factor"] == 0.4321
    config2, params2 = vae_lib.load(tmp_path / "vae")
    assert config2 == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)
    # A corrupted file fails loudly, naming the parameter.
    params["decoder"]["conv_out"]["bias"] = np.full_like(params["decoder"]["conv_out"]["bias"], np.nan)
    vae_lib.save(tmp_path / "bad", config, params)
    with pytest.raises(ValueError, match="decoder/conv_out/bias"):
        vae_lib.load(tmp_path / "bad")


@pytest.mark.slow
def test_load_pretrained_reads_diffusers_save_pretrained(tmp_path):
    tm = torch_vae(norm_num_groups=16)
    tm.save_pretrained(tmp_path / "model", safe_serialization=True)
    assert (tmp_path / "model/diffusion_pytorch_model.safetensors").is_file()
    config, params = vae_lib.load_pretrained(tmp_path / "model")
    assert config.scaling_factor == tm.config.scaling_factor and config.norm_num_groups == 16
    x = images(seed=1)
    t_mean, t_logvar, t_recon = torch_outputs(tm, x)
    mean, logvar, recon = flax_outputs(config, params, x, t_mean)
    assert max(rel_err(mean, t_mean), rel_err(logvar, t_logvar), rel_err(recon, t_recon)) < 1e-4

    # The same files in a Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>/}.
    cache = tmp_path / "models--org--vae"
    shutil.copytree(tmp_path / "model", cache / "snapshots" / "abc123")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("abc123")
    _, params2 = vae_lib.load_pretrained(cache)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)

    (tmp_path / "model/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors"):
        vae_lib.load_pretrained(tmp_path / "model")


# ---------------------------------------------------------------------------------------------- stage

TINY = ["--set", "data.image_size=16", "--set", "vae.block_out_channels=[8]",
        "--set", "vae.norm_num_groups=4", "--set", "vae.layers_per_block=1", "--set", "vae.steps=3",
        "--set", "vae.batch_size=8", "--set", "vae.pretrained=null"]


def write_data(root: Path, n: int = 20, size: int = 16) -> None:
    """What the data stage writes: images/<class>/<file>.png, index.json, manifest.json; plus one
    file that went bad after indexing, which the vae stage must skip and list."""
    from PIL import Image

    data = root / "artifacts" / "data"
    items = []
    rng = np.random.default_rng(0)
    for i in range(n):
        rel = f"{i % 2}/{i:05d}.png"
        (data / "images" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(data / "images" / rel)
        items.append([rel, i % 2, hashlib.sha256((data / "images" / rel).read_bytes()).hexdigest()])
    (data / "images" / "1" / "broken.png").write_bytes(b"not a png")
    items.append(["1/broken.png", 1, "0" * 64])  # the sha256 of the bytes the data stage saw
    (data / "index.json").write_text(json.dumps({"root": "images", "classes": ["0", "1"], "items": items}))
    (data / "manifest.json").write_text("{}")


@pytest.mark.slow
def test_stage_trains_and_writes_outputs(workdir):
    write_data(workdir)
    run_stage("vae", workdir, *TINY)
    out = workdir / "artifacts" / "vae"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "vae.msgpack"]
    config, _ = vae_lib.load(out)
    assert config.block_out_channels == (8,) and config.scaling_factor > 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["processed"] == 20 and m["counts"]["steps"] == 3
    assert m["counts"]["processed"] + m["counts"]["skipped"] == m["counts"]["total"]
    assert [s["item"].endswith("broken.png") for s in m["skipped"]] == [True]
    assert "data" in m["inputs_sha256"] and np.isfinite(m["recon_psnr_db"])
    assert m["scaling_factor"] == config.scaling_factor


@pytest.mark.slow
def test_stage_fails_in_one_line_and_writes_nothing(workdir):
    proc = run_stage("vae", workdir, *TINY, check=False)  # no artifacts/data yet
    assert proc.returncode == 2 and "artifacts/data" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    write_data(workdir)
    proc = run_stage("vae", workdir, *TINY, "--set", "vae.norm_num_groups=3", check=False)
    assert proc.returncode == 2 and "vae.norm_num_groups" in proc.stderr
    proc = run_stage("vae", workdir, *TINY, "--set", "vae.pretrained=/nonexistent/vae", check=False)
    assert proc.returncode == 2 and "vae.pretrained" in proc.stderr
    assert not (workdir / "artifacts" / "vae").exists()


@pytest.mark.slow
def test_stage_converts_a_pretrained_folder(workdir, tmp_path):
    tm = torch_vae(norm_num_groups=16)
    tm.save_pretrained(tmp_path / "sd-vae", safe_serialization=True)
    run_stage("vae", workdir, *TINY, "--set", f"vae.pretrained={tmp_path / 'sd-vae'}")  # no data needed
    config, params = vae_lib.load(workdir / "artifacts" / "vae")
    want_config, want_params = vae_lib.load_pretrained(tmp_path / "sd-vae")
    assert config == want_config and config.scaling_factor == 0.18215
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, want_params)
    m = json.loads((workdir / "artifacts" / "vae" / "manifest.json").read_text())
    assert m["counts"]["steps"] == 0 and "pretrained" in m["inputs_sha256"]


@pytest.mark.slow
def test_encode_parity_full_sd_config_at_256():
    """The posterior the encode job stores, at the SD VAE's full size (sd-vae-ft-ema's config, random
    weights converted) on 256 px images: mean and std within 1e-4 relative of diffusers', compiled as the
    job compiles it (dit.backend's CPU options: Eigen convolutions) and with XLA's defaults."""
    from dit import backend

    tm = torch_vae(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
    config = VAEConfig.from_diffusers(dict(tm.config))
    params = vae_lib.convert_diffusers_state_dict(state_dict_np(tm), config)
    x = images(n=2, size=256, seed=3)
    with torch.no_grad():
        dist = tm.encode(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).latent_dist
    t_mean, t_std = (t.numpy().transpose(0, 2, 3, 1) for t in (dist.mean, dist.std))
    model = AutoencoderKL(config)
    assert backend.conv_compiler_options() is not None  # on CPU with this jax: the job's options are in use
    for options in (backend.conv_compiler_options(), None):
        encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode),
                         compiler_options=options)
        mean, logvar = encode(params, x)
        assert mean.shape == (2, 32, 32, 4)
        assert rel_err(mean, t_mean) < 1e-4, options
        assert rel_err(np.exp(0.5 * np.asarray(logvar, np.float64)), t_std) < 1e-4, options


DECODE_ON_DEVICES = """
import hashlib, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from dit import vae as vae_lib
from dit.backend import conv_compiler_options
from dit.sharding import BATCH_AXES, make_mesh
vae_lib.MIN_CONV_FEATURES = int(sys.argv[1])
config = vae_lib.VAEConfig(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=4)
params = vae_lib.init_params(config, jax.random.key(0))
vae, n, per = vae_lib.AutoencoderKL(config), jax.device_count(), 64
mesh = make_mesh(-1, 1)
rows = P(BATCH_AXES)
z = jax.device_put(jax.random.normal(jax.random.key(5), (n * per, 16, 16, 4)), NamedSharding(mesh, rows))
decode = jax.jit(jax.shard_map(lambda p, z: vae.apply({"params": p}, z, method=vae.decode), mesh=mesh,
                               in_specs=(P(), rows), out_specs=rows), compiler_options=conv_compiler_options())
print(hashlib.sha256(np.asarray(decode(params, z))[:per].tobytes()).hexdigest())
"""


def decode_sha(devices: int, min_features: int) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run([sys.executable, "-c", DECODE_ON_DEVICES, str(min_features)], env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    return proc.stdout.split()[-1]


@pytest.mark.slow
def test_decode_gives_the_same_bytes_on_any_device_count():
    """The same 64 latents decoded per device on 2 and on 3 XLA:CPU devices: the same bytes. XLA:CPU
    runs the 3-channel conv_out on a device-count-dependent path; NarrowConv's padded kernel avoids it.
    With the padding off (MIN_CONV_FEATURES = 0) the two differ here (checked when this was written)."""
    assert decode_sha(2, vae_lib.MIN_CONV_FEATURES) == decode_sha(3, vae_lib.MIN_CONV_FEATURES)


def test_narrow_conv_is_nn_conv():
    """NarrowConv has nn.Conv's params and gives its outputs (to float32 rounding)."""
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    for k, s, pad in ((3, 1, 1), (1, 1, 0), (3, 2, 0)):
        ref = nn.Conv(3, (k, k), strides=(s, s), padding=((pad, pad), (pad, pad)))
        params = ref.init(jax.random.key(1), x)
        ours = vae_lib.NarrowConv(3, k, s, pad)
        assert jax.tree.map(np.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(np.shape, params)
        np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
    half = x.astype(jnp.bfloat16)  # nn.Conv's dtype rule too: bf16 input, f32 params -> f32 output
    assert ours.apply(params, half).dtype == ref.apply(params, half).dtype


def test_iter_images_reads_only_the_positions_asked_for(tmp_path, monkeypatch):
    """yardsticks keeps N evenly spaced images: only those are read and decoded, not the whole index."""
    from stages.runtime import images as images_mod
    from stages.runtime.images import iter_images, read_index

    write_data(tmp_path)
    index = read_index(tmp_path / "artifacts/data")
    opened = []
    real = images_mod.decode_image
    monkeypatch.setattr(images_mod, "decode_image", lambda data, size: opened.append(1) or real(data, size))
    got = list(iter_images(index, 16, only={0, 5, 20}))
    assert [k.rsplit("/", 1)[-1] for k, _, _ in got] == ["00000.png", "00005.png", "broken.png"]
    assert len(opened) == 2 and not isinstance(got[0][2], Exception) and isinstance(got[2][2], Exception)

