"""A damaged newest checkpoint costs one checkpoint interval, not the run: truncated, missing or flipped bytes
in Orbax's files of the newest step, or in its metadata, make the trainer move that step aside (outside the
DVC output, kept, named in one line and in the manifest) and resume from the step before, ending with the
EMA bytes of an uninterrupted run. Readers of the final step (sample) never take another step instead."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_stage
from test_train_resume import RUN, STEPS, manifest, saved_steps, straight  # noqa: F401  (module fixtures)
from test_train_sample import ONE, SAMPLE, fresh_copy, latents  # noqa: F401

pytestmark = pytest.mark.slow  # training runs resumed from damaged checkpoints

SHORT = STEPS - 20  # the run that gets damaged stops here; its newest step is SHORT


@pytest.fixture(scope="module")
def stopped(latents, tmp_path_factory):
    """A run of the reference's params stopped at step SHORT (the reference goes on to STEPS)."""
    wd = fresh_copy(latents, tmp_path_factory.mktemp("stopped") / "wd")
    run_stage("train", wd, *RUN, "--set", f"train.steps={SHORT}", env=ONE)
    return wd


def data_files(step_dir: Path, item: str) -> list[Path]:
    """The array data files of one Orbax item (OCDBT: under .../d/), largest first."""
    files = [p for p in (step_dir / item).rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*"))
    return sorted(files, key=lambda p: -p.stat().st_size)


def truncate(step_dir):
    f = data_files(step_dir, "state")[0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def remove(step_dir):
    data_files(step_dir, "ema")[0].unlink()


def flip(step_dir):
    """Bytes changed inside the EMA's data, where a read still succeeds: the checksums must catch it."""
    f = data_files(step_dir, "ema")[0]
    data = bytearray(f.read_bytes())
    for k in range(len(data) // 2, len(data) // 2 + 64, 8):
        data[k] ^= 0x10
    f.write_bytes(bytes(data))


def break_metadata(step_dir):
    for p in (step_dir / "ema").rglob("*"):
        if p.is_file() and "metadata" in p.name.lower():
            p.write_text("{not json")


@pytest.mark.parametrize("damage", [truncate, remove, flip, break_metadata])
def test_a_damaged_newest_step_costs_one_interval_and_ends_with_the_same_bytes(stopped, straight, tmp_path, damage):
    wd = tmp_path / "wd"
    shutil.copytree(stopped, wd)
    ckpt = wd / "artifacts/checkpoints"
    steps = saved_steps(wd)
    assert steps[-1] == SHORT and len(steps) == 3
    damage(ckpt / "orbax" / str(SHORT))
    proc = run_stage("train", wd, *RUN, env=ONE)
    said = [line for line in proc.stdout.splitlines() if "does not restore" in line]
    assert len(said) == 1 and f"orbax/{SHORT}" in said[0] and "moved to" in said[0], proc.stdout[-3000:]
    m = manifest(wd)
    assert m["resumed_from_step"] == steps[-2] and m["final_step"] == STEPS
    assert m["ema_sha256"] == manifest(straight)["ema_sha256"]  # the uninterrupted run's bytes
    (entry,) = m["damaged_steps"]
    assert entry["step"] == SHORT and entry["reason"] in said[0]
    moved = wd / entry["moved_to"]  # relative to the project, as every path in a manifest
    assert moved.is_dir() and moved.parent == wd / "artifacts/checkpoints.damaged"  # outside the DVC output
    assert (moved.parent / f"{moved.name}.reason.txt").read_text().strip() == entry["reason"]
    if damage is flip:
        assert "checksum" in entry["reason"]  # the read succeeded; the checksums told


def test_no_step_restores_is_one_line_and_the_run_is_not_silently_lost(stopped, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(stopped, wd)
    for step in saved_steps(wd):
        flip(wd / "artifacts/checkpoints/orbax" / str(step))
    proc = run_stage("train", wd, *RUN, env=ONE, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "no step restores: all 3 moved to" in proc.stderr
    assert len(list((wd / "artifacts/checkpoints.damaged").glob("orbax-*.reason.txt"))) == 3


def test_sample_never_substitutes_another_step_for_the_damaged_final_one(straight, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(straight, wd)
    flip(wd / "artifacts/checkpoints/orbax" / str(STEPS))
    proc = run_stage("sample", wd, *SAMPLE, env=ONE, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and f"orbax/{STEPS}" in lines[0], proc.stderr[-2000:]
    assert "checksum" in lines[0] and not (wd / "artifacts/samples").exists()


def test_a_re_reached_kept_ema_is_verified_not_saved_again(latents, straight, tmp_path):
    """EMAs kept every 20 steps: resuming from SHORT - 20 re-reaches SHORT, whose kept EMA exists. It is
    checked against the recomputed EMA and kept as it is (Orbax refused to save a step twice before); one
    that was damaged is moved aside and saved anew. keep_every does not change the weights: the EMA ends
    as the reference's."""
    import jax

    from dit.models import DiTConfig
    from dit.sharding import make_mesh
    from stages.runtime import checkpoint

    keep = ["--set", "train.keep_every=20"]
    base = fresh_copy(latents, tmp_path / "base")
    run_stage("train", base, *RUN, *keep, "--set", f"train.steps={SHORT}", env=ONE)
    for damage_kept in (False, True):
        wd = tmp_path / f"wd{damage_kept}"
        shutil.copytree(base, wd)
        ckpt = wd / "artifacts/checkpoints"
        flip(ckpt / "orbax" / str(SHORT))
        if damage_kept:
            flip(ckpt / "kept" / str(SHORT))
        kept_before = (ckpt / "kept" / str(SHORT) / "ema").stat().st_mtime_ns
        proc = run_stage("train", wd, *RUN, *keep, env=ONE)
        assert manifest(wd)["ema_sha256"] == manifest(straight)["ema_sha256"]
        assert sorted(int(p.name) for p in (ckpt / "kept").iterdir()) == list(range(20, STEPS + 1, 20))
        note = [line for line in proc.stdout.splitlines() if f"kept/{SHORT}" in line]
        assert len(note) == (1 if damage_kept else 0), proc.stdout[-2000:]
        rewritten = (ckpt / "kept" / str(SHORT) / "ema").stat().st_mtime_ns != kept_before
        assert rewritten == damage_kept
        config = DiTConfig(**json.loads((ckpt / "model.json").read_text())["dit"])
        for step in (SHORT, STEPS):  # every kept EMA verifies against its checksums
            ema = checkpoint.restore_ema(checkpoint.kept_manager(ckpt), step, config, make_mesh(-1, 1))
            assert all(np.isfinite(x).all() for x in jax.tree.leaves(ema))
