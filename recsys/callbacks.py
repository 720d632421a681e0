"""Callbacks of our own; everything else comes from Lightning."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import Callback


class SamplesPerSecond(Callback):
    """Logs training throughput ``train/samples_per_sec`` once per epoch.

    Counts the samples of every training batch and the wall time between batches (data
    loading, forward, backward and optimizer step; validation excluded), on each process;
    the logged figure is that rate times the world size. ``overall`` holds the figure over
    the whole fit.
    """

    def __init__(self) -> None:
        self.overall: float | None = None
        self._samples = self._seconds = 0.0
        self._epoch_samples = self._epoch_seconds = 0.0
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_samples = self._epoch_seconds = 0.0
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._epoch_seconds += now - self._last
            self._epoch_samples += len(batch)
        self._last = now

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last = None  # validation inside an epoch does not count

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.training:
            self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_seconds <= 0:
            return
        self._samples += self._epoch_samples
        self._seconds += self._epoch_seconds
        rate = self._epoch_samples / self._epoch_seconds * trainer.world_size
        self.overall = self._samples / self._seconds * trainer.world_size
        pl_module.log("train/samples_per_sec", rate, prog_bar=False)
