"""Callbacks of our own; everything else comes from Lightning."""

from __future__ import annotations

import logging
import random
import time

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count

log = logging.getLogger(__name__)


class SamplesPerSecond(Callback):
    """Logs training throughput ``train/samples_per_sec`` once per epoch.

    Counts the samples of every training batch and the wall time between batches (data
    loading, forward, backward and optimizer step; validation excluded), on each process;
    the logged figure is that rate times the world size. ``overall`` holds the figure over
    the whole fit.

    Kept beside Lightning's ``ThroughputMonitor``, which reports a sliding window of recent
    steps: ``overall`` is the one whole-fit figure that ``metrics.json`` and the benchmarks
    print, so runs of different lengths compare.
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


class ValidationHistory(Callback):
    """Keeps the figures of every validation of a fit, so that a run reports those of the
    checkpoint it tests rather than those of its last epoch.

    ``validations`` holds one entry per validation (sanity checks excluded): ``epoch``,
    ``step`` (the global step, as in the checkpoint saved then) and ``metrics``, the ``val/*``
    figures as floats. ``train_epochs`` maps each finished epoch to its ``train/*`` figures
    (the epoch means). Both travel in the checkpoints, so a resumed fit still knows the epochs
    before the interruption.
    """

    def __init__(self) -> None:
        self.validations: list[dict] = []
        self.train_epochs: dict[int, dict[str, float]] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        figures = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.validations.append(
            {"epoch": trainer.current_epoch, "step": trainer.global_step, "metrics": figures}
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_epochs[trainer.current_epoch] = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("train/") and not k.endswith(("_step", "_epoch"))
        }

    def state_dict(self) -> dict:
        return {"validations": self.validations, "train_epochs": self.train_epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.validations = list(state_dict["validations"])
        self.train_epochs = dict(state_dict["train_epochs"])


class RandomState(Callback):
    """Saves the random generators' states (torch CPU and CUDA, numpy, Python) in every
    checkpoint and puts them back when the resumed run takes its first training step, so it
    draws what the uninterrupted run drew there (dropout masks, ...). Lightning's checkpoints
    do not hold them; the loaders' draws have seeds of their own (`BatchIndexSampler`)."""

    def __init__(self) -> None:
        self._to_restore: dict | None = None

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._to_restore = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._to_restore is None:
            return
        state, self._to_restore = self._to_restore, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state["python"])


class ParameterSummary(ModelSummary):
    """Lightning's model summary cut to what the model has: the modules that hold parameters
    (down to ``max_depth``), their type and parameter count, and the totals. The metric modules
    (no parameters), the train/eval mode and the FLOPs (not counted for these layers) are left
    out."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs,
    ) -> None:
        columns = dict(summary_data)
        rows = [
            (name, kind, params)
            for name, kind, params in zip(
                columns["Name"], columns["Type"], columns["Params"], strict=True
            )
            if params.strip() != "0"
        ]
        width = max((len(name) for name, _, _ in rows), default=0)
        kinds = max((len(kind) for _, kind, _ in rows), default=0)
        lines = [
            f"  {name:<{width}}  {kind:<{kinds}}  {params.strip():>7}"
            for name, kind, params in rows
        ]
        total = (
            f"Model: {get_human_readable_count(total_parameters)} parameters "
            f"({get_human_readable_count(trainable_parameters)} trainable, {model_size:.1f} MB)"
        )
        log.info("%s\n%s", total, "\n".join(lines))
