"""The Beam encode job: real ArrayRecord shards that Grain reads back, same bytes on any runner mode."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_stage
from dit import vae as vae_lib
from pipelines.encode import decode_record

pytestmark = pytest.mark.slow  # Beam encode jobs


def tiny_vae_params():
    """(config, params) of a 2-level VAE (16 px images -> 8x8x4 latents) at its random init."""
    config = vae_lib.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
                               norm_num_groups=4, scaling_factor=0.5)
    x = jnp.zeros((1, 16, 16, 3))
    return config, vae_lib.AutoencoderKL(config).init(jax.random.key(0), x, jax.random.key(1))["params"]


def tiny_vae(folder: Path) -> vae_lib.VAEConfig:
    config, params = tiny_vae_params()
    vae_lib.save(folder, config, params)
    (folder / "manifest.json").write_text("{}")
    return config


@pytest.fixture
def encoded(workdir):
    run_stage("data", workdir, "--set", "data.limit=20", "--set", "data.image_size=16")
    tiny_vae(workdir / "artifacts/vae")
    return workdir


def shard_hashes(workdir):
    m = json.loads((workdir / "artifacts/latents/manifest.json").read_text())
    return [(s["file"], s["sha256"]) for s in m["shards"]], m


def test_shards_hold_every_image_and_its_flip(encoded):
    run_stage("encode", encoded, "--set", "data.image_size=16", "--set", "encode.shards=3", "--set", "encode.batch_size=8",
              "--set", "encode.num_workers=1")
    hashes, m = shard_hashes(encoded)
    assert len(hashes) == 3 and m["counts"] == {"total": 20, "processed": 20, "skipped": 0, "records": 40}
    assert m["latent_shape"] == [8, 8, 4] and m["scaling_factor"] == 0.5

    from array_record.python.array_record_data_source import ArrayRecordDataSource

    files = sorted((encoded / "artifacts/latents").glob("*.array_record"))
    source = ArrayRecordDataSource([str(f) for f in files])
    records = [decode_record(source[i]) for i in range(len(source))]
    seen = {(r["index"], r["flip"]) for r in records}
    assert seen == {(i, f) for i in range(20) for f in (0, 1)}
    index = json.loads((encoded / "artifacts/data/index.json").read_text())
    assert all(r["label"] == index["items"][r["index"]][1] for r in records)

    # the stored moments are the VAE's encoding of the centre-cropped image and of its mirror (to float
    # rounding: the job runs another batch shape, compiled with dit.backend's CPU options)
    from stages.runtime.images import load_image

    config, params = vae_lib.load(encoded / "artifacts/vae")
    model = vae_lib.AutoencoderKL(config)
    img = load_image(encoded / "artifacts/data/images" / index["items"][5][0], 16)
    x = np.stack([img, img[:, ::-1]]).astype(np.float32) / 127.5 - 1.0
    mean, logvar = model.apply({"params": params}, x, method=model.encode)
    got = {r["flip"]: r for r in records if r["index"] == 5}
    for flip in (0, 1):
        np.testing.assert_allclose(got[flip]["mean"], mean[flip], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[flip]["logvar"], logvar[flip], rtol=1e-5, atol=1e-5)


def test_same_bytes_in_memory_and_multi_processing(encoded):
    run_stage("encode", encoded, "--set", "data.image_size=16", "--set", "encode.num_workers=1", "--set", "encode.batch_size=8")
    first, _ = shard_hashes(encoded)
    run_stage("encode", encoded, "--set", "data.image_size=16", "--set", "encode.num_workers=2", "--set", "encode.batch_size=8")
    second, _ = shard_hashes(encoded)
    assert first == second


def test_an_image_changed_since_the_data_stage_is_skipped_and_listed(encoded):
    """An image overwritten after the data stage indexed it (here with bytes that do not even decode) is
    not encoded under the old image's sha256: its bytes are checked against index.json."""
    index = json.loads((encoded / "artifacts/data/index.json").read_text())
    victim = encoded / "artifacts/data/images" / index["items"][3][0]
    victim.write_bytes(b"garbage")
    run_stage("encode", encoded, "--set", "data.image_size=16", "--set", "encode.num_workers=1", "--set", "encode.batch_size=8")
    _, m = shard_hashes(encoded)
    assert m["counts"] == {"total": 20, "processed": 19, "skipped": 1, "records": 38}
    assert m["skipped"][0]["item"].endswith(index["items"][3][0]) and "changed since the data stage" in m["skipped"][0]["reason"]


def test_too_many_shards_is_refused(encoded):
    proc = run_stage("encode", encoded, "--set", "data.image_size=16", "--set", "encode.shards=50", check=False)
    assert proc.returncode == 2 and "encode.shards" in proc.stderr
    assert not (encoded / "artifacts/latents").exists()


@pytest.mark.parametrize("args, needle", [
    (["--set", "encode.runner=NoSuchRunner"], "encode.runner"),
    (["--set", "encode.dtype=bfloat16"], "encode.dtype"),
    ([], "artifacts/vae"),  # the VAE folder's config does not match its weights
])
def test_bad_whole_job_input_is_one_line_exit_2(encoded, args, needle):
    if not args:
        config = json.loads((encoded / "artifacts/vae/config.json").read_text())
        config["latent_channels"] = 8
        (encoded / "artifacts/vae/config.json").write_text(json.dumps(config))
    proc = run_stage("encode", encoded, "--set", "data.image_size=16", *args, check=False)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert not (encoded / "artifacts/latents").exists()
