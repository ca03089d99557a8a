"""The train log on its own (no JAX): continuation after a resume, windows, non-finite stop, MFU."""

import json

import pytest

from stages.runtime.chips import peak_tflops
from stages.runtime.train_log import NonFinite, TrainLog


def metrics(loss):
    return {"loss": loss, "mse": loss * 0.9, "vb": loss * 0.1, "grad_norm": 1.0}


def new_log(path, start=0, window=None, steps=10):
    return TrainLog(path, primary=True, start=start, steps=steps, log_every=4, global_batch=8,
                    flops_per_image=1e9, peak=None, devices=1, window=window)


def test_a_resumed_log_drops_lines_past_the_restored_step_and_keeps_the_window(tmp_path):
    path = tmp_path / "train.jsonl"
    log = new_log(path)
    for s in range(1, 7):
        log.step_done(s, metrics(float(s)))
    log.flush()
    window = dict(log.window)  # steps 5 and 6, as a checkpoint at step 6 would hold it
    log.step_done(7, metrics(7.0))
    log.step_done(8, metrics(8.0))
    log.flush()
    log.close()
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 4, 8]
    path.write_text(path.read_text() + '{"step": 9, "lo')  # a line cut short by a kill
    resumed = new_log(path, start=6, window=window)
    for s in (7, 8):
        resumed.step_done(s, metrics(float(s)))
    resumed.flush()
    resumed.close()
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 4, 8]
    assert rows[-1]["loss"] == pytest.approx((5 + 6 + 7 + 8) / 4)  # the window crossed the restart
    tsv = (tmp_path / "train.tsv").read_text().splitlines()
    assert tsv[0].startswith("step\tloss") and [l.split("\t")[0] for l in tsv[1:]] == ["1", "4", "8"]


def test_a_non_finite_loss_names_its_step(tmp_path):
    log = new_log(tmp_path / "train.jsonl")
    log.step_done(1, metrics(1.0))
    log.step_done(2, metrics(float("nan")))
    with pytest.raises(NonFinite) as e:
        log.flush()
    assert e.value.step == 2
    log.close()


def test_peaks_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16", None) == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "float32", None) == 156.0
    assert peak_tflops("TPU v5 lite", "bfloat16", None) == 197.0
    assert peak_tflops("TPU v4", "bfloat16", None) == 275.0
    assert peak_tflops("cpu", "float32", None) is None
    assert peak_tflops("cpu", "float32", 2.5) == 2.5
    log = TrainLog("unused", primary=False, start=0, steps=1, log_every=1, global_batch=1,
                   flops_per_image=118.64e9, peak=989.0, devices=8, window=None)
    # DiT-XL/2: 118.64 G multiply-adds forward = 237.3 GFLOP; x3 for training; 1000 img/s on 8 H100s
    assert log.mfu(1000.0) == pytest.approx(2 * 118.64e9 * 3 * 1000 / (989e12 * 8))
    assert log.mfu(None) is None
