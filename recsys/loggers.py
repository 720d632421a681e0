"""Experiment loggers that need a decision at start-up."""

from __future__ import annotations

import logging
import os

from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

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

    Args:
        offline: True or False to force; None (default) decides: offline unless an API key
            is configured (``WANDB_API_KEY`` or ``wandb login``) or ``WANDB_MODE`` is set.
        **kwargs: passed to `WandbLogger` (project, group, tags, save_dir, ...).
    """
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
