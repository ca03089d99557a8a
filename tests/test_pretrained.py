"""The released-weights route on a tiny random official-format checkpoint written with torch.save:
convert -> Orbax layout -> restore_ema gives the same weights; bad checkpoints refused in one line."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import ROOT  # noqa: E402
from test_parity_diffusers import random_official_state_dict  # noqa: E402

from dit import convert  # noqa: E402
from dit.models import dit_config  # noqa: E402
from stages import pretrained  # noqa: E402
from stages.runtime.common import StageError, sha256_file, tree_sha256  # noqa: E402

pytestmark = pytest.mark.slow  # released-weight conversions

TINY = dict(depth=2, hidden_size=32, num_heads=2, patch_size=4)  # at 64 px: an 8x8 latent, 4 tokens


class NotATensor:  # module-level so torch.save can pickle it; weights_only loading must refuse it
    def __init__(self):
        self.x = 1


def tiny_sd(image_size=64, num_classes=10, seed=0, **overrides):
    cfg = dit_config(None, input_size=image_size // 8, num_classes=num_classes, **{**TINY, **overrides})
    return cfg, random_official_state_dict(cfg, seed=seed)


def save(path, obj):
    to_t = lambda sd: {k: torch.from_numpy(v) for k, v in sd.items()}
    if isinstance(obj, dict) and all(isinstance(v, dict) for v in obj.values()):
        obj = {k: to_t(v) for k, v in obj.items()}
    elif isinstance(obj, dict) and all(isinstance(v, np.ndarray) for v in obj.values()):
        obj = to_t(obj)
    torch.save(obj, path)
    return path


def test_route_restores_the_same_weights(tmp_path):
    from dit.sharding import make_mesh
    from stages.runtime import checkpoint

    cfg, sd = tiny_sd()
    _, other = tiny_sd(seed=1)
    src = save(tmp_path / "ckpt.pt", {"model": other, "ema": sd})  # train.py layout: the EMA is taken
    out = tmp_path / "checkpoints"
    doc = pretrained.export(src, out, None, 64, 10, **TINY)

    want = tree_sha256(convert.official_to_params(sd, cfg))
    mgr = checkpoint.manager(out)
    assert mgr.latest_step() == 0  # what the sample stage restores
    ema = checkpoint.restore_ema(mgr, 0, cfg, make_mesh(-1, 1))
    assert tree_sha256(ema) == want == doc["ema_sha256"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ema_sha256"] == want and manifest["final_step"] == 0 and manifest["taken"] == "ema"
    assert manifest["source_sha256"] == manifest["inputs_sha256"]["source"] == sha256_file(src)
    assert manifest["input_paths"]["source"]["path"] == src.as_posix()
    info = json.loads((out / "model.json").read_text())
    # the keys stages/train.py writes, so sample and audit read either
    assert set(info) == {"dit", "scaling_factor", "classes", "learn_sigma", "diffusion_steps", "final_step"}
    assert dit_config(**info["dit"]) == cfg and info["scaling_factor"] == 0.18215
    assert info["classes"] == [str(i) for i in range(10)] and info["final_step"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.json", "orbax"]
    assert (out / "orbax" / "0" / "ema").is_dir() and not (out / "orbax" / "0" / "state").exists()

    # a bare state dict (the released files) and {"model": ...} load the same way
    for obj, taken in ((sd, "state_dict"), ({"model": sd}, "model")):
        _, params, info = pretrained.convert_checkpoint(save(tmp_path / "x.pt", obj), None, 64, 10, **TINY)
        assert info["taken"] == taken and tree_sha256(params) == want


def test_wrong_config_or_missing_key_refused_naming_the_key(tmp_path):
    cfg, sd = tiny_sd()
    src = save(tmp_path / "ok.pt", sd)
    # another resolution: only the position embedding's length differs
    with pytest.raises(ValueError, match=r"'pos_embed' has shape \(1, 4, 32\), expected \(1, 16, 32\)"):
        pretrained.convert_checkpoint(src, None, 128, 10, **TINY)
    with pytest.raises(ValueError, match=r"'y_embedder.embedding_table.weight' has shape \(11, 32\), "
                                         r"expected \(1001, 32\)"):
        pretrained.convert_checkpoint(src, None, 64, 1000, **TINY)
    with pytest.raises(ValueError, match=r"missing key 'blocks.2.attn.qkv.weight'"):
        pretrained.convert_checkpoint(src, None, 64, 10, **{**TINY, "depth": 3})
    with pytest.raises(ValueError, match=r"'x_embedder.proj.weight' has shape \(32, 4, 4, 4\), "
                                         r"expected \(384, 4, 2, 2\)"):
        pretrained.convert_checkpoint(src, "DiT-S/2", 64, 10)
    bad = dict(sd)
    del bad["final_layer.linear.bias"]
    with pytest.raises(ValueError, match=r"missing key 'final_layer.linear.bias'"):
        pretrained.convert_checkpoint(save(tmp_path / "missing.pt", bad), None, 64, 10, **TINY)
    with pytest.raises(ValueError, match=r"unexpected key 'extra.weight'"):
        pretrained.convert_checkpoint(save(tmp_path / "extra.pt", {**sd, "extra.weight": sd["pos_embed"]}),
                                      None, 64, 10, **TINY)


def test_not_a_state_dict_or_needing_pickle_refused(tmp_path):
    cases = {
        "list.pt": ([torch.zeros(2)], r"expected a state dict .* got list"),
        "tensor.pt": (torch.zeros(2), r"expected a state dict .* got Tensor"),
        "mixed.pt": ({"w": torch.zeros(2), "epoch": 3}, r"entry 'epoch' is int, not a tensor"),
        "pickle.pt": ({"w": torch.zeros(2), "args": NotATensor()}, r"weights_only=True.*no pickle code runs"),
    }
    for name, (obj, msg) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError, match=msg) as e:
            pretrained.convert_checkpoint(tmp_path / name, None, 64, 10, **TINY)
        assert "\n" not in str(e.value), name
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="weights_only=True"):
        pretrained.convert_checkpoint(tmp_path / "junk.pt", None, 64, 10, **TINY)
    with pytest.raises(StageError, match="does not exist"):
        pretrained.export(tmp_path / "nope.pt", tmp_path / "out", None, 64, 10, **TINY)
    assert not (tmp_path / "out").exists()


def test_cli_exit_2_one_line_nothing_written(tmp_path):
    cfg, sd = tiny_sd()
    src = save(tmp_path / "tiny.pt", sd)
    torch.save({"w": torch.zeros(2), "args": NotATensor()}, tmp_path / "pickle.pt")
    out = tmp_path / "checkpoints"
    # the tiny weights are not a DiT-XL/2 at 256 px; a pickle file is refused; out stays absent
    for pt, msg in ((src, "'x_embedder.proj.weight' has shape (32, 4, 4, 4), expected (1152, 4, 2, 2)"),
                    (tmp_path / "pickle.pt", "weights_only=True")):
        proc = subprocess.run([sys.executable, "-m", "stages.pretrained", str(pt), str(out), "--model", "DiT-XL/2",
                               "--image-size", "256"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], proc.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["pickle.pt", "tiny.pt"]
