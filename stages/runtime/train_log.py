"""What the trainer reports: logs/train.jsonl (process 0), a tqdm bar, throughput and MFU.

- Continuation: a resumed run keeps the log's lines up to the restored step and drops the rest (a killed
  run may have logged past its last checkpoint), so every logged step appears once.
- One-step-late reads: step s's metrics are read once step s+1 is dispatched, so the host never waits on
  the device for them; before a checkpoint the current step is read (a state is saved only after its
  step's loss and gradient norm were seen finite).
- Windows: a line holds the means of loss, mse, vb and grad norm since the previous line. Their running
  sums travel in each checkpoint's meta item, so a run resumed after a kill writes the lines an
  uninterrupted one does. A finished run extended past its old `train.steps` keeps the line it wrote at
  that final step; where that step is not a multiple of log_every, the next window starts there (a line
  more than a run made with the larger `steps` from the start; the weights are the same).
- Timing pauses around checkpoint saves and skips each process's first (compiling) step; img/s and MFU are
  null when a window holds no timed step.
- MFU = 2 x forward MACs per image (dit.flops counts a multiply-add as one flop, as the paper does; peak
  figures count it as two) x 3 (forward + backward) x img/s / (peak per device x devices).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

FIELDS = ("loss", "mse", "vb", "grad_norm")
# logs/train.tsv repeats the lines for `dvc plots` (which reads JSON, YAML, CSV and TSV but not JSONL)
PLOT_COLUMNS = ("step", *FIELDS, "img_per_s", "mfu")

class NonFinite(Exception):
    def __init__(self, step: int, values: dict):
        self.step, self.values = step, values
        super().__init__(f"step {step}: {values}")


class TrainLog:
    def __init__(self, path: Path, primary: bool, start: int, steps: int, log_every: int,
                 global_batch: int, flops_per_image: float, peak: float | None, devices: int,
                 window: dict | None):
        self.path, self.primary, self.steps, self.every = Path(path), primary, steps, log_every
        self.batch, self.flops, self.peak, self.devices = global_batch, flops_per_image, peak, devices
        self.window = dict(window) if window else self.empty()
        self.pending = None  # (step, device metrics) not read yet
        self.compile_s: float | None = None
        self.timed_steps, self.timed_s = 0, 0.0  # this process, whole run (the manifest's img/s)
        self._win_steps, self._win_s = 0, 0.0
        self._started, self._last = time.perf_counter(), None
        self._file = self._continue(start) if primary else None
        self._bar = None
        if primary:
            from tqdm import tqdm

            self._bar = tqdm(total=steps, initial=start, desc="train", unit="step", mininterval=2.0,
                             file=sys.stderr, dynamic_ncols=True)

    @staticmethod
    def empty() -> dict:
        return {"count": 0, **{k: 0.0 for k in FIELDS}}

    def _continue(self, start: int):
        kept = []
        if start > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    break
                if row.get("step", math.inf) > start:
                    break
                kept.append(line + "\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(kept))
        tmp.rename(self.path)
        tsv = self.path.with_suffix(".tsv")
        tmp = tsv.with_name(f".{tsv.name}.tmp")
        tmp.write_text("\t".join(PLOT_COLUMNS) + "\n" + "".join(self._tsv(json.loads(l)) for l in kept))
        tmp.rename(tsv)
        self._plots = open(tsv, "a")
        return open(self.path, "a")

    @staticmethod
    def _tsv(row: dict) -> str:
        return "\t".join("" if row.get(k) is None else f"{row[k]:.6g}" for k in PLOT_COLUMNS) + "\n"

    # --------------------------------------------------------------------------------- per step

    def step_done(self, step: int, metrics) -> None:
        """Called after step `step` (1-based) is dispatched: reads the previous step's metrics."""
        now = time.perf_counter()
        if self._last is None:
            self.compile_s = now - self._started
        else:
            self.timed_steps += 1
            self.timed_s += now - self._last
            self._win_steps += 1
            self._win_s += now - self._last
        self._last = now
        previous, self.pending = self.pending, (step, metrics)
        if previous is not None:
            self._read(*previous)
        if self._bar is not None:
            self._bar.update(1)

    def flush(self) -> None:
        """Read the current step's metrics now (before a checkpoint, a log line or the end)."""
        if self.pending is not None:
            previous, self.pending = self.pending, None
            self._read(*previous)

    def _read(self, step: int, metrics) -> None:
        values = {k: float(metrics[k]) for k in FIELDS}
        if not all(math.isfinite(v) for v in values.values()):
            raise NonFinite(step, values)
        self.window["count"] += 1
        for k in FIELDS:
            self.window[k] += values[k]
        if step == 1 or step % self.every == 0 or step == self.steps:
            self._write(step)

    def _write(self, step: int) -> None:
        n = self.window["count"]
        row = {"step": step, **{k: self.window[k] / n for k in FIELDS}}
        timed = self._win_steps and self._win_s > 0 and step > 1  # step 1's window is one dispatch
        img_s = self._win_steps * self.batch / self._win_s if timed else None
        row["steps_per_s"] = img_s / self.batch if img_s else None
        row["img_per_s"] = img_s
        row["mfu"] = self.mfu(img_s)
        self.window, self._win_steps, self._win_s = self.empty(), 0, 0.0
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
            self._plots.write(self._tsv(row))
            self._plots.flush()
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{img_s:.1f}" if img_s else "-")

    def mfu(self, img_s: float | None) -> float | None:
        if not img_s or not self.peak:
            return None
        return 2 * self.flops * 3 * img_s / (self.peak * 1e12 * self.devices)

    # --------------------------------------------------------------------------------- timing

    def paused(self):
        """Context: time spent inside (a checkpoint save) counts in no img/s."""
        log = self

        class _Pause:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if log._last is not None:
                    log._last += time.perf_counter() - self.t0

        return _Pause()

    def steady_img_per_s(self) -> float | None:
        return self.timed_steps * self.batch / self.timed_s if self.timed_steps and self.timed_s else None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
            self._plots.close()
