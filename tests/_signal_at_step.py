"""Test helper for tests/test_preemption.py: a callback that marks a training step and stops there for a signal."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback


class SignalAtStep(Callback):
    """At the end of optimizer step `step` (counted over the whole run), write `marker`, then send `signum` to this
    process, or (`signum=0`) wait up to `timeout` seconds for a signal from outside. Only once: a rerun that finds the
    marker trains on. `start_step` records where training (re)started.
    """

    def __init__(self, marker: str, step: int, signum: int = 0, timeout: float = 120.0) -> None:
        self.marker, self.step, self.signum, self.timeout = Path(marker), step, signum, timeout
        self.start_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step != self.step or self.marker.exists():
            return
        self.marker.write_text(str(trainer.global_step))
        if self.signum:
            os.kill(os.getpid(), self.signum)
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)  # the handler runs between these sleeps
