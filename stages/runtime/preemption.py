"""When to stop early: SIGTERM (what a TPU VM or spot instance gets before it goes) or SIGINT.

One process: a signal handler sets a flag; the loop checks it between steps, saves at the current step and
exits non-zero. Several processes: every host must stop at the same step, so the answer comes from JAX's
preemption sync point (through Orbax's `reached_preemption`), which JAX's own SIGTERM notifier drives once
`jax.distributed` is initialised. Installing a Python SIGTERM handler there would replace JAX's, so none
is installed; JAX answers False when `jax.distributed` is not initialised, hence the flag for one process.
"""

from __future__ import annotations

import signal


class Preemption:
    def __init__(self, multihost: bool):
        self.signum: int | None = None
        self._previous = {}
        if not multihost:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def should_stop(self, mgr, step: int) -> bool:
        return self.signum is not None or mgr.reached_preemption(step)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "preemption notice"

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)  # the shell's convention for "killed by signal"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
