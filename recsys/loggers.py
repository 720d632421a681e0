"""Experiment loggers that need a decision at start-up."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch import loggers as pl_loggers
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

log = logging.getLogger(__name__)


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        return bool(wandb.Api(timeout=5).api_key)
    except Exception:  # no netrc, no settings, or wandb refuses without network
        return False


def wandb_logger(offline: bool | None = None, **kwargs) -> WandbLogger:
    """A `WandbLogger` that runs offline when there are no W&B credentials.

    Runs of one Hydra multirun share a W&B group (the sweep folder's name) unless ``group``
    is given, so a sweep can be compared in one view.

    Args:
        offline: True or False to force; None (default) decides: offline unless an API key
            is configured (``WANDB_API_KEY`` or ``wandb login``) or ``WANDB_MODE`` is set.
        **kwargs: passed to `WandbLogger` (project, group, tags, save_dir, ...).
    """
    if kwargs.get("group") is None and HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            kwargs["group"] = Path(hydra_cfg.sweep.dir).name
    if offline is None:
        mode = os.environ.get("WANDB_MODE")
        offline = mode in ("offline", "dryrun") if mode else not _wandb_has_credentials()
        if offline:
            save_dir = kwargs.get("save_dir", ".")
            log.warning(
                "W&B: no credentials found, logging offline under %s/wandb. Upload later with "
                "`wandb sync %s/wandb/offline-run-*` after `wandb login`.",
                save_dir,
                save_dir,
            )
    if offline:  # Lightning's WANDB_MODE=dryrun no longer stops wandb 0.2x+ from logging in
        kwargs.setdefault("mode", "offline")
    return WandbLogger(offline=offline, **kwargs)


def mlflow_logger(tracking_uri: str, **kwargs) -> MLFlowLogger:
    """An `MLFlowLogger`; a local ``file:`` store works without a tracking server.

    MLflow 3 refuses new file stores unless ``MLFLOW_ALLOW_FILE_STORE`` is set; a local folder
    is what a user without a server asks for with ``file:``, so it is allowed here. Point
    ``tracking_uri`` (or env ``MLFLOW_TRACKING_URI``) at a server to use one.
    """
    if tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(tracking_uri=tracking_uri, **kwargs)


class _CSVWriter(ExperimentWriter):
    """Lightning's CSV writer, but it keeps the columns of a file written by another process.

    Under ``ddp_spawn`` fit and test run in different processes: the test process's writer
    does not know the columns that the fit process wrote and fails to extend the header
    ("dict contains fields not in fieldnames", the failure of upstream
    https://github.com/Lightning-AI/pytorch-lightning/issues/19432). Reading the header back
    first fixes that; this override of a private method is the one workaround, kept here.
    """

    def _record_new_keys(self) -> set[str]:
        if not self.metrics_keys and self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys.extend(next(csv.reader(file), []))
        return super()._record_new_keys()


class CSVLogger(pl_loggers.CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` that survives fit and test in separate processes
    (see `_CSVWriter`)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _CSVWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _CSVWriter(log_dir=self.log_dir)
        return self._experiment
