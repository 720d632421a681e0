"""Training: data, model, Trainer from the config; fit, test the best checkpoint, report."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recsys.allocator import set_malloc_thresholds
from recsys.baselines import evaluate_with_baseline
from recsys.callbacks import SamplesPerSecond, ValidationHistory
from recsys.checkpoint import checkpoint_state
from recsys.console import describe, quiet_libraries, stop_reason
from recsys.data.base import RecDataModule
from recsys.runs import instantiate_group, model_context, report, write_test_results

log = logging.getLogger(__name__)


def build(cfg: DictConfig) -> tuple[RecDataModule, L.LightningModule, L.Trainer]:
    """Data module (prepared and set up), model sized from its metadata and holding the
    training data's item statistics, and Trainer. Sets the process's ``malloc`` thresholds
    first (`set_malloc_thresholds`). The model is built from the processed data's spec before
    the data is loaded (`RecDataModule.setup`), so a model that cannot read the data (NeuMF
    on a click log without ids) says so before that work."""
    set_malloc_thresholds(**cfg.get("malloc") or {})
    dm: RecDataModule = instantiate(cfg.data)
    dm.prepare_data()  # the model needs the dataset's sizes before the Trainer starts
    # ValidationHistory is what run() reports the validation figures from: not optional
    callbacks = [*instantiate_group(cfg.get("callbacks")), ValidationHistory()]
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    with model_context(trainer):  # trainer=torchrec: the tables start on the meta device
        model = instantiate(cfg.model, spec=dm.spec.to_dict(), _recursive_=False)
    dm.setup()  # the training split's item statistics (novelty, diversity)
    model.set_item_statistics(**dm.protocol.item_statistics())
    if model.closed_form:  # EASE, ItemKNN: fitted here; the Trainer then steps nothing
        model.net.fit(*dm.training_pairs())
    config = OmegaConf.to_container(cfg, resolve=True)
    for lg in trainer.loggers:
        lg.log_hyperparams(config)
    return dm, model, trainer


def run(cfg: DictConfig) -> dict[str, float | int | str]:
    """Train, test the best checkpoint and the popularity baseline, write ``metrics.json``.

    Returns the test metrics of the best checkpoint (``test/auroc``, ...), the popularity
    baseline's (``popularity/test/auroc``, ...), the validation and training figures of that
    checkpoint (`fit_figures`: ``val/auroc``, ``train/loss``, ``best_epoch``, ``best_step``),
    the training throughput over the whole fit and ``best_model_path``. A sweeper optimises
    ``cfg.optimized_metric`` from it.
    """
    quiet_libraries()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    dm, model, trainer = build(cfg)
    if cfg.get("ckpt_path"):
        log.info("resuming from %s", cfg.ckpt_path)
    trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))

    reason = stop_reason(trainer)  # before testing, which restores the callbacks' states
    ckpt = trainer.checkpoint_callback
    best = ckpt.best_model_path if ckpt is not None else ""
    if not best:
        log.warning(
            "no best checkpoint (fast_dev_run or no checkpoint callback): testing the current "
            "weights; val/* are those of the last validation (last_epoch, last_step)"
        )
    metrics: dict[str, float | int | str] = fit_figures(trainer)
    metrics.update(evaluate_with_baseline(trainer, model, dm, best or None))
    speed = next((c for c in trainer.callbacks if isinstance(c, SamplesPerSecond)), None)
    if speed is not None and speed.overall is not None:
        metrics["train/samples_per_sec"] = speed.overall
    metrics["best_model_path"] = best
    title = [describe(dm, model)]
    if "best_epoch" in metrics:
        title.append(f"tested: the best checkpoint by {cfg.monitor}, epoch {metrics['best_epoch']}")
    else:
        title.append("tested: the last weights (no best checkpoint)")
    if reason:
        title[-1] += f"; training stopped: {reason}"
    report(metrics, Path(cfg.paths.output_dir), title)
    write_test_results(model, dm, Path(cfg.paths.output_dir), best or None)
    return metrics


def fit_figures(trainer: L.Trainer) -> dict[str, float | int]:
    """The validation figures of the checkpoint that is tested, and where they come from.

    With a best checkpoint: every ``val/*`` figure of the validation that saved it, the
    ``train/*`` means of its epoch, ``best_epoch`` and ``best_step``, read from the checkpoint
    itself (its `ValidationHistory` state), so they are right under every launcher
    (``ddp_spawn`` trains in other processes). Without one (fast_dev_run, ``callbacks=none``):
    those of the last validation, with ``last_epoch`` and ``last_step``; the weights tested are
    then the last ones too. The per-epoch history is in the loggers.
    """
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.best_model_path:
        path = Path(ckpt.best_model_path)
        state = checkpoint_state(path)
        history = state["callbacks"][ValidationHistory.__qualname__]
        for entry in history["validations"]:
            if (entry["epoch"], entry["step"]) == (state["epoch"], state["global_step"]):
                return _figures(entry, history["train_epochs"], "best")
        raise RuntimeError(f"{path} holds no record of the validation that saved it")
    history = next(c for c in trainer.callbacks if isinstance(c, ValidationHistory))
    if not history.validations:
        return {}
    return _figures(history.validations[-1], history.train_epochs, "last")


def _figures(entry: dict, train_epochs: dict, source: str) -> dict[str, float | int]:
    return {
        **train_epochs.get(entry["epoch"], {}),
        **entry["metrics"],
        f"{source}_epoch": entry["epoch"],
        f"{source}_step": entry["step"],
    }
