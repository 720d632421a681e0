"""Experiment loggers that need a decision at start-up, and the logging of a part of a run
that has settings of its own (`nested_run`: the popularity baseline's test)."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch import loggers as pl_loggers
from lightning.pytorch.loggers import WandbLogger
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


def mlflow_logger(
    tracking_uri: str,
    run_dir: str | None = None,
    run_name: str | None = None,
    tags: dict | None = None,
    **kwargs,
) -> pl_loggers.MLFlowLogger:
    """An `MLFlowLogger`; a local store works without a tracking server.

    ``sqlite:///<path>`` (the default, ``logs/mlflow.db``): the folder is made if need be.
    ``file:<folder>``: MLflow 3 refuses new file stores unless ``MLFLOW_ALLOW_FILE_STORE`` is
    set; a local folder is what a user asks for with ``file:``, so it is allowed here (``mlflow
    ui`` needs the same variable). Point ``tracking_uri`` (or env ``MLFLOW_TRACKING_URI``) at
    a server to use one.

    The run is named after the run folder ``run_dir`` unless ``run_name`` is given (MLflow's
    own names come from `random`, which the run's seed makes the same every time), and its
    tag ``run_dir`` holds the folder's path (checkpoints, metrics.json).
    """
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if run_dir is not None:
        run_name = run_name or Path(run_dir).name
        tags = {"run_dir": str(Path(run_dir).resolve()), **(tags or {})}
    return pl_loggers.MLFlowLogger(
        tracking_uri=tracking_uri, run_name=run_name, tags=tags, **kwargs
    )


class NestedMLFlowLogger(pl_loggers.MLFlowLogger):
    """A run named ``name`` nested under ``parent``'s run, in its experiment and store (the
    ``mlflow.parentRunId`` tag: ``mlflow ui`` lists it under the parent run).

    Metrics named ``<name>/...`` are logged without that prefix, so that the nested run's
    figures stand in the same columns as the parent run's (``popularity/test/auroc`` is
    ``test/auroc`` of the run ``popularity``).
    """

    def __init__(self, parent: pl_loggers.MLFlowLogger, name: str):
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        super().__init__(
            experiment_name=parent._experiment_name,
            run_name=name,
            tracking_uri=parent._tracking_uri,
            tags={MLFLOW_PARENT_RUN_ID: parent.run_id},
        )
        self._drop_prefix = f"{name}/"

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = {k.removeprefix(self._drop_prefix): v for k, v in metrics.items()}
        super().log_metrics(metrics, step)


@contextmanager
def nested_run(trainer: L.Trainer, module: L.LightningModule, name: str) -> Iterator[None]:
    """Log what ``trainer`` does with ``module`` in this block as the part ``name`` of the
    logged run: a part with settings of its own, such as the popularity baseline's test.

    An MLflow run gets a run nested under it (`NestedMLFlowLogger`) that holds the module's
    hyperparameters and its metrics. The other loggers (CSV, W&B) have one run each: they get
    the module's metrics (named ``<name>/...`` by the module) in the run itself, and not its
    hyperparameters, which would overwrite the model's (and which MLflow refuses to change:
    "Changing param values is not allowed").
    """
    loggers = trainer.loggers
    parts = [
        NestedMLFlowLogger(lg, name) if isinstance(lg, pl_loggers.MLFlowLogger) else lg
        for lg in loggers
    ]
    for lg in parts:
        if lg not in loggers:
            lg.log_hyperparams(module.hparams_initial)
    # what Lightning logs at the start of every fit and test unless the module was built with
    # save_hyperparameters(logger=False)
    module._log_hyperparams = False
    trainer.loggers = parts
    try:
        yield
    finally:
        trainer.loggers = loggers


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
