"""Released weights -> FID through DVC: `dvc repro released/dvc.yaml` in a temporary copy of the repo, from
a tiny random official-format checkpoint written with torch.save, a diffusers VAE folder and an ADM-style
reference batch; the audit holds, and names the .pt file once it is edited."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_end_to_end import copy_project, git_commit_all, sh, while_edited

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow

MODEL = {"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2}


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage 'released/dvc.yaml:(\w+)'", output)


def write_inputs(ext: Path) -> dict:
    from diffusers import AutoencoderKL

    from dit.models import dit_config
    from test_parity_diffusers import random_official_state_dict

    cfg = dit_config(None, input_size=4, num_classes=10, **MODEL)
    sd = random_official_state_dict(cfg, seed=0)
    torch.save({"ema": {k: torch.from_numpy(v) for k, v in sd.items()}}, ext / "tiny.pt")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(ext / "vae")
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 255, (24, 4, 4, 3))
    ref = coarse.repeat(8, 1).repeat(8, 2).clip(0, 255).astype(np.uint8)
    np.savez(ext / "ref.npz", arr_0=ref)
    from metrics.inception_weights import default_torchscript_path

    shutil.copyfile(default_torchscript_path(), ext / "inception.pt")  # a copy the audit test can edit
    return {"data": {"image_size": 32},
            "pretrained": {"path": str(ext / "tiny.pt"), "model": MODEL, "image_size": 32, "num_classes": 10},
            "vae": {"pretrained": str(ext / "vae")},
            "sample": {"num_samples": 20, "num_sampling_steps": "ddim5", "batch_size": 10,
                       "grid_per_class": 2, "labels": "uniform"},
            "reference": {"adm_batch": str(ext / "ref.npz")},
            "evaluate": {"inception_source": "torchscript", "inception_path": str(ext / "inception.pt"),
                         "batch_size": 24}}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    base = tmp_path_factory.mktemp("released")
    dst, ext = base / "repo", base / "files"
    ext.mkdir()
    copy_project(dst)
    params = yaml.safe_load((dst / "released/params.yaml").read_text())
    for key, over in write_inputs(ext).items():
        params[key].update(over)
    (dst / "released/params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = git_commit_all(dst, "tiny released")
    out = sh([sys.executable, "-m", "dvc", "repro", "released/dvc.yaml"], dst, env)
    return dst, ext, env, out


def audit(dst, env):
    return subprocess.run([sys.executable, "-m", "stages.audit"], cwd=dst / "released", env=env,
                          capture_output=True, text=True, timeout=600)


def test_released_weights_to_fid_in_one_repro(released):
    dst, ext, env, out = released
    assert sorted(ran(out)) == ["evaluate", "pretrained", "reference", "sample", "vae"], out[-3000:]
    a = dst / "released/artifacts"
    metrics = json.loads((a / "eval/metrics.json").read_text())
    assert np.isfinite(metrics["metrics"]["fid"])
    ckpt = json.loads((a / "checkpoints/manifest.json").read_text())
    assert ckpt["stage"] == "pretrained" and ckpt["taken"] == "ema"
    assert ckpt["inputs_sha256"]["source"] == ckpt["source_sha256"]
    assert metrics["provenance"]["ema_sha256"] == ckpt["ema_sha256"]
    assert ran(sh([sys.executable, "-m", "dvc", "repro", "released/dvc.yaml"], dst, env)) == []


def test_audit_walks_back_to_the_pt_file_and_names_it_when_edited(released):
    dst, ext, env, _ = released
    proc = audit(dst, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pretrained <- source" in proc.stdout
    pt = ext / "tiny.pt"
    original = pt.read_bytes()
    sd = torch.load(pt, weights_only=True)
    sd["ema"]["final_layer.linear.bias"] += 1.0
    torch.save(sd, pt)
    try:
        proc = audit(dst, env)
    finally:
        pt.write_bytes(original)
    assert proc.returncode == 1
    assert f"pretrained <- source ({pt})" in proc.stderr + proc.stdout
    assert "FAILED at 'pretrained <- source" in proc.stderr


def test_audit_names_an_inception_file_replaced_after_the_fid(released):
    """The Inception weights are an input of every manifest that computed features with them (reference,
    evaluate): an edited weights file fails the audit, named, even where DVC does not track it."""
    dst, ext, env, _ = released
    m = json.loads((dst / "released/artifacts/eval/manifest.json").read_text())
    pt = ext / "inception.pt"
    assert Path(m["input_paths"]["inception"]["path"]).resolve() == pt.resolve()
    proc = while_edited(pt, pt.read_bytes() + b"\0", lambda: audit(dst, env))
    assert proc.returncode == 1
    said = proc.stderr + proc.stdout
    assert "FAILED at 'evaluate <- inception (" in said, said[-3000:]

