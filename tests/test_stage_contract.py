"""The contract every stage keeps: declared params only, one-line errors with exit 2, atomic outputs."""

import json

import pytest
import yaml

from conftest import ROOT, run_stage
from stages.runtime import common


def test_params_view_holds_only_declared_keys(workdir):
    view = common.load_params("vae", ["--params", str(workdir / "params.yaml")])
    assert set(view) == {"data", "vae"}
    assert set(view["data"]) == {"image_size"}  # vae reads data.image_size only
    with pytest.raises(KeyError):
        view["data"]["source"]


def test_set_overrides_and_coerces(workdir):
    view = common.load_params("train", ["--params", str(workdir / "params.yaml"),
                                        "--set", "train.steps=7", "--set", "train.lr=1",
                                        "--set", "train.mesh.fsdp=2"])
    assert view["train"]["steps"] == 7
    assert view["train"]["lr"] == 1.0 and isinstance(view["train"]["lr"], float)
    assert view["train"]["mesh"] == {"data": -1, "fsdp": 2}


@pytest.mark.parametrize("args, needle", [
    (["--set", "data.bogus=1"], "data.bogus"),
    (["--set", "train.steps=5"], "train.steps"),            # declared for train, not for data
    (["--set", "data.image_size=big"], "data.image_size"),
    (["--set", "data.image_size"], "KEY=VALUE"),
    (["--params", "missing.yaml"], "missing.yaml"),
    (["--set", "data.source=imagefolder"], "data.path"),
    (["--set", "data.source=imagefolder", "--set", "data.path=/no/such/dir"], "/no/such/dir"),
    (["--set", "data.source=webdataset"], "data.source"),
    (["--set", "data.min_size=0"], "data.min_size"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(workdir, args, needle):
    proc = run_stage("data", workdir, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert not (workdir / "artifacts").exists() or not any((workdir / "artifacts").iterdir())


@pytest.mark.parametrize("stage, args, needle", [
    ("curves", ["--set", "curves.samplers=['dpm++10', 'bogus']"], "curves.samplers"),
    ("curves", ["--set", "curves.train_sampler=dpm++x"], "curves.train_sampler"),
    ("evaluate", ["--set", "evaluate.fid_method=svd"], "evaluate.fid_method"),
    ("evaluate", ["--set", "evaluate.batch_size=0"], "evaluate.batch_size"),
])
def test_a_bad_choice_is_named_before_reading_artifacts(workdir, stage, args, needle):
    """No upstream artifacts exist here: the sampler names and the FID method are checked first, in one
    line."""
    proc = run_stage(stage, workdir, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0] and "artifacts/" not in lines[0], proc.stderr


@pytest.mark.parametrize("stage", ["encode", "train", "sample", "reference", "evaluate"])
def test_missing_upstream_is_named(workdir, stage):
    proc = run_stage(stage, workdir, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "artifacts/" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_atomic_dir_keeps_old_output_on_failure(tmp_path):
    out = tmp_path / "out"
    with common.atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with common.atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left behind


def test_every_stage_declares_its_code_and_params():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in spec.items():
        assert stage["cmd"] == f"python -m stages.{name}"
        assert f"stages/{name}.py" in stage["deps"]
        for dep in stage["deps"]:
            assert (ROOT / dep).exists() or dep.startswith("artifacts/"), dep
        for key in common.declared_params(name, ROOT / "dvc.yaml"):
            common._get(params, key)  # every declared key exists in params.yaml


def _project_imports(path, module_level_only):
    """Project modules (stages, dit, metrics, pipelines) that a file imports, as repo-relative paths."""
    import ast

    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            rel = name.replace(".", "/") + ".py"
            if name.split(".")[0] in ("stages", "dit", "metrics", "pipelines") and (ROOT / rel).is_file():
                found.add(rel)
    return found


@pytest.mark.parametrize("pipeline", ["dvc.yaml", "released/dvc.yaml"])
def test_every_stage_lists_the_code_it_runs(pipeline):
    """dvc repro reruns a stage when its code changes only if that code is a dep: the project modules the
    stage's own module imports (anywhere in it), and what every listed module imports at its top."""
    spec = yaml.safe_load((ROOT / pipeline).read_text())["stages"]
    for name, stage in spec.items():
        deps = {d.removeprefix("../") for d in stage["deps"]}
        need = _project_imports(ROOT / f"stages/{name}.py", module_level_only=False)
        todo = [d for d in deps | need if d.endswith(".py")]
        while todo:
            more = _project_imports(ROOT / todo.pop(), module_level_only=True) - need
            need |= more
            todo += list(more)
        missing = sorted(m for m in need - deps if not m.endswith("__init__.py"))
        assert not missing, f"{pipeline} stage {name}: deps miss {missing}"


def test_sample_chunks_are_keyed_by_the_machine_and_the_model_config(workdir):
    """Chunks made on another kind of machine (bytes differ in the last bits between CPU models and core
    counts, and between GPU kinds) or for another model.json are recomputed, never mixed in."""
    import types

    import jax

    from stages.runtime.sampler import fingerprint

    cfg = common.load_params("sample", ["--params", str(workdir / "params.yaml")])["sample"]
    gpu = lambda kind: types.SimpleNamespace(platform="gpu", device_kind=kind)  # noqa: E731
    fp = lambda model, device, program="p" * 64: fingerprint(cfg, 0, "e" * 64, "v" * 64, model, device, program,
                                                            "i" * 64)
    base = fp("m" * 64, gpu("NVIDIA H100 80GB HBM3"))
    assert base != fp("m" * 64, gpu("NVIDIA A100-SXM4-40GB"))
    assert base != fp("n" * 64, gpu("NVIDIA H100 80GB HBM3"))
    assert base != fp("m" * 64, gpu("NVIDIA H100 80GB HBM3"), program="q" * 64)
    here = fp("m" * 64, jax.devices("cpu")[0])
    assert here["platform"] == "cpu" and here["machine"].endswith(" cores") and here["machine"][0] != ";"


def test_tree_hash_is_canonical():
    import numpy as np

    a = {"b": np.ones(3, np.float32), "a": {"k": np.zeros((2, 2))}}
    b = {"a": {"k": np.zeros((2, 2))}, "b": np.ones(3, np.float32)}
    assert common.tree_sha256(a) == common.tree_sha256(b)
    b["b"] = b["b"] + 1e-7
    assert common.tree_sha256(a) != common.tree_sha256(b)


def _params_file(workdir, edit):
    text = (workdir / "params.yaml").read_text()
    for old, new in edit:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = workdir / "edited.yaml"
    path.write_text(text)
    return ["--params", str(path)]


def test_a_float_written_without_a_dot_is_read_as_the_float(workdir):
    """YAML 1.1 reads `lr: 1e-4` as the string '1e-4'; the project's own params file says lr is a float."""
    view = common.load_params("train", _params_file(workdir, [("  lr: 0.001 ", "  lr: 1e-4 ")]))
    assert view["train"]["lr"] == 1e-4 and isinstance(view["train"]["lr"], float)


@pytest.mark.parametrize("edit, needle", [
    ([("  grad_clip:", "  grad_clipp:")], "train.grad_clipp: unknown param"),    # a misspelling
    ([("  cpu_devices: ", "  # cpu_devices: ")], "train.cpu_devices: missing from"),  # an older file
    ([("mesh: {data: -1, fsdp: 1}", "mesh: {data: -1}")], "train.mesh.fsdp: missing from"),
])
def test_a_missing_or_unknown_param_is_one_line(workdir, edit, needle):
    with pytest.raises(common.StageError, match=needle.replace(".", r"\.")):
        common.load_params("train", _params_file(workdir, edit))


@pytest.mark.parametrize("key, value", [
    ("lr", "1e-4x"), ("lr", 0.0), ("lr", -1.0), ("weight_decay", -0.1), ("ema_decay", 1.0),
    ("class_dropout_prob", 1.5), ("learn_sigma", "yes"), ("use_flips", 1), ("seed", 1.5), ("seed", 2 ** 32),
    ("num_workers", -1),
])
def test_train_params_are_checked_before_anything_is_touched(workdir, key, value):
    from stages.runtime import train_step as train

    cfg = common.load_params("train", ["--params", str(workdir / "params.yaml")])["train"]
    train.check_params(cfg)  # the project's own values pass
    with pytest.raises(common.StageError, match=f"train.{key}: expected"):
        train.check_params({**cfg, key: value})


@pytest.mark.parametrize("sets, needle", [
    ({"num_heads": 5}, "train.num_heads: DiTConfig.num_heads=5 does not divide"),
    ({"hidden_size": 130, "num_heads": 2}, "train.hidden_size: "),
    ({"block": "foo"}, "train.block: "),
    ({"model": "DiT-Q/2"}, "train.model: unknown DiT model name"),
])
def test_a_bad_model_field_names_its_own_param(workdir, sets, needle):
    from stages.runtime import train_step as train

    cfg = common.load_params("train", ["--params", str(workdir / "params.yaml")])["train"]
    with pytest.raises(common.StageError, match=needle):
        train.model_config({**cfg, **sets}, (8, 8, 4), 10)


def test_atomic_dir_removes_what_killed_runs_left(tmp_path):
    """A stage killed mid-write (SIGKILL: no cleanup runs) leaves .<name>.tmp-<pid>; the next run removes
    it, and keeps a folder whose writer is still alive."""
    import os
    import signal
    import subprocess
    import sys

    code = ("import os, sys; sys.path.insert(0, sys.argv[2]); from stages.runtime.common import atomic_dir\n"
            "with atomic_dir(sys.argv[1]) as tmp:\n"
            "    (tmp / 'half.bin').write_bytes(b'x' * 1000); os.kill(os.getpid(), 9)\n")
    final = tmp_path / "latents"
    left = []
    for _ in range(2):  # the second killed run removes the first's folder before it makes its own
        proc = subprocess.run([sys.executable, "-c", code, str(final), str(ROOT)])
        assert proc.returncode == -signal.SIGKILL
        left.append(sorted(p.name for p in tmp_path.iterdir()))
    assert [len(names) for names in left] == [1, 1] and left[0] != left[1] and not final.exists()
    assert all(names[0].startswith(".latents.tmp-") for names in left)
    alive = tmp_path / f".latents.tmp-{os.getppid()}"  # a writer still running (this test's parent)
    alive.mkdir()
    with common.atomic_dir(final) as tmp:
        (tmp / "done.bin").write_bytes(b"y")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["latents", alive.name])
    assert [p.name for p in final.iterdir()] == ["done.bin"]


def _key_tree(tree, prefix=""):
    keys = []
    for k, v in tree.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys += _key_tree(v, f"{prefix}{k}.")
    return keys


def test_shipped_params_files_hold_every_key_of_their_pipeline():
    """The README's ImageNet route copies params-imagenet.yaml over params.yaml: it must hold every key the
    pipeline's stages read, or a stage fails hours in (the curves stage runs after training)."""
    main = yaml.safe_load((ROOT / "params.yaml").read_text())
    imagenet = yaml.safe_load((ROOT / "params-imagenet.yaml").read_text())
    assert _key_tree(imagenet) == _key_tree(main)
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]:
        common.check_keys(imagenet, main, common.declared_params(stage, ROOT / "dvc.yaml"),
                          ROOT / "params-imagenet.yaml")
    released = yaml.safe_load((ROOT / "released/params.yaml").read_text())
    for stage in yaml.safe_load((ROOT / "released/dvc.yaml").read_text())["stages"]:
        for key in common.declared_params(stage, ROOT / "released/dvc.yaml"):
            common._get(released, key)


@pytest.mark.parametrize("key, value", [
    ("cfg_scale", float("nan")), ("cfg_scale", float("inf")), ("cfg_scale", 0.5), ("seed", -1), ("seed", 1.5),
    ("seed", 2 ** 32),
])
def test_sample_params_are_checked_before_the_checkpoint_is_read(workdir, key, value):
    """NaN guidance would fail `> 1` and sample unguided while the manifest records NaN; a seed outside
    uint32 overflows in fold_in after the checkpoint was restored; 1.5 would silently sample as 1."""
    from stages import sample

    cfg = common.load_params("sample", ["--params", str(workdir / "params.yaml")])["sample"]
    sample.check_params(cfg)
    with pytest.raises(common.StageError, match=f"sample.{key}: expected"):
        sample.check_params({**cfg, key: value})



def test_scratch_dir_is_removed_after_and_a_killed_runs_is_removed_next_time(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has exited
    left = tmp_path / f".yardsticks.scratch-{dead}"
    left.mkdir()
    (left / "floor.npz").write_bytes(b"x" * 100)
    final = tmp_path / "yardsticks"
    with common.scratch_dir(final) as scratch:
        assert scratch.is_dir() and not left.exists()
        (scratch / "rfid.npz").write_bytes(b"y")
    assert list(tmp_path.iterdir()) == []


def test_curves_off_writes_its_outputs_at_once(workdir):
    """curves.enabled: false (the embedded default): the stage's outputs with no points, without reading
    any artifact or importing JAX, so `dvc repro` has them and reruns nothing."""
    proc = run_stage("curves", workdir)
    out = workdir / "artifacts/curves"
    assert "curves: off" in proc.stdout and json.loads((out / "curves.json").read_text()) == {"enabled": False,
                                                                                              "points": []}
    assert (out / "fid_vs_step.tsv").read_text().splitlines() == ["step\ttrain_gflops\tfid\tsfid\tprecision\trecall"]
    assert (out / "fid_vs_sampling.tsv").read_text().count("\n") == 1 and (out / "manifest.json").is_file()
