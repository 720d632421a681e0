"""Training: data, model, Trainer from the config; fit, test the best checkpoint, report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from recsys.baselines import popularity_auroc
from recsys.callbacks import SamplesPerSecond
from recsys.data.base import RecDataModule

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a config group that holds several objects (callbacks,
    loggers); entries set to null are skipped."""
    return [instantiate(c) for c in (cfg or {}).values() if c is not None]


def build(cfg: DictConfig) -> tuple[RecDataModule, L.LightningModule, L.Trainer]:
    """Data module (prepared), model sized from its metadata, and Trainer."""
    dm: RecDataModule = instantiate(cfg.data)
    dm.prepare_data()  # the model needs the dataset's sizes before the Trainer starts
    model = instantiate(cfg.model, spec=dm.spec.to_dict(), _recursive_=False)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    config = OmegaConf.to_container(cfg, resolve=True)
    for lg in trainer.loggers:
        lg.log_hyperparams(config)
    return dm, model, trainer


def run(cfg: DictConfig) -> dict[str, float | str]:
    """Train, test the best checkpoint, write ``metrics.json``; returns the metrics.

    The returned dict holds every metric logged at the end (``test/auroc``, ``val/auroc``,
    ...), the popularity baseline on the test split, training throughput and
    ``best_model_path``. A sweeper optimises ``cfg.optimized_metric`` from it.
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    dm, model, trainer = build(cfg)
    trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    ckpt = trainer.checkpoint_callback
    best = ckpt.best_model_path if ckpt is not None else ""
    if not best:
        log.warning(
            "no best checkpoint (fast_dev_run or no checkpoint callback): "
            "testing the current weights"
        )
    trainer.test(model, datamodule=dm, ckpt_path=best or None)

    metrics: dict[str, float | str] = {**fit_metrics}
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    metrics["test/popularity_auroc"] = popularity_auroc(dm, "test")
    speed = next((c for c in trainer.callbacks if isinstance(c, SamplesPerSecond)), None)
    if speed is not None and speed.overall is not None:
        metrics["train/samples_per_sec"] = speed.overall
    metrics["best_model_path"] = best
    _report(metrics, Path(cfg.paths.output_dir))
    return metrics


@rank_zero_only
def _report(metrics: dict, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    lines = [f"  {k:<28} {v:.4f}" for k, v in sorted(metrics.items()) if isinstance(v, float)]
    log.info(
        "Results (also in %s):\n%s\n  best checkpoint: %s",
        output_dir / "metrics.json",
        "\n".join(lines),
        metrics["best_model_path"] or "-",
    )
