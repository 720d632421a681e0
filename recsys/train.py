"""Training: data, model, Trainer from the config; fit, test the best checkpoint, report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from recsys.baselines import evaluate_with_baseline
from recsys.callbacks import SamplesPerSecond
from recsys.data.base import RecDataModule
from recsys.distributed import TorchRecStrategy  # noqa: F401  (registers trainer.strategy=torchrec)

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
    model.data_config = OmegaConf.to_container(cfg.data, resolve=True)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    config = OmegaConf.to_container(cfg, resolve=True)
    for lg in trainer.loggers:
        lg.log_hyperparams(config)
    return dm, model, trainer


def run(cfg: DictConfig) -> dict[str, float | str]:
    """Train, test the best checkpoint and the popularity baseline, write ``metrics.json``.

    Returns every metric logged at the end (``test/auroc``, ``val/auroc``,
    ``popularity/test/auroc``, ...), training throughput and ``best_model_path``. A sweeper
    optimises ``cfg.optimized_metric`` from it.
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
    metrics: dict[str, float | str] = {**fit_metrics}
    metrics.update(evaluate_with_baseline(trainer, model, dm, best or None))
    speed = next((c for c in trainer.callbacks if isinstance(c, SamplesPerSecond)), None)
    if speed is not None and speed.overall is not None:
        metrics["train/samples_per_sec"] = speed.overall
    metrics["best_model_path"] = best
    report(metrics, Path(cfg.paths.output_dir))
    return metrics


@rank_zero_only
def report(metrics: dict, output_dir: Path) -> None:
    """Write ``metrics.json`` into the run folder and print the numbers."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    lines = [f"  {k:<32} {v:.4f}" for k, v in sorted(metrics.items()) if isinstance(v, float)]
    extra = [f"  {k}: {v}" for k, v in sorted(metrics.items()) if isinstance(v, str)]
    log.info("Results (also in %s):\n%s", output_dir / "metrics.json", "\n".join(lines + extra))
