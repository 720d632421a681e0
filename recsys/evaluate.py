"""Evaluation of a checkpoint: rebuild its model and data, test, report."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recsys.baselines import evaluate_with_baseline
from recsys.data.base import DataMismatchError, RecDataModule, from_checkpoint
from recsys.distributed.torchrec_strategy import (
    TorchRecStrategy,
    load_meta,
    load_shards,
    load_weights_only,
)
from recsys.lit.module import RecommenderModule
from recsys.metrics.ranking import latency_percentiles, peak_memory_mb
from recsys.train import report

log = logging.getLogger(__name__)


def load_checkpoint(
    cfg: DictConfig, unshard: bool = True
) -> tuple[RecDataModule, RecommenderModule]:
    """The model of ``cfg.ckpt_path`` and its data module (prepared and set up).

    The checkpoint is read once, with ``weights_only=True`` (one from elsewhere never runs code
    here). A sharded checkpoint folder (trainer=torchrec) is read through its ``meta.pt``; with
    ``unshard`` its shards load into one plain model, else the weights are left to the strategy
    (``trainer.test(ckpt_path=...)`` puts each shard on its rank).

    The data module is rebuilt from the checkpoint's hyperparameters with this run's ``paths``
    and the changes in ``cfg.data`` (and ``cfg.ranking``), on the processed folder that the
    checkpoint names in ``paths.cache_dir``: the raw files are not needed. Changes of the data
    settings are refused unless ``cfg.allow_new_data`` (`recsys.data.base.from_checkpoint`).
    """
    path = Path(cfg.ckpt_path)
    if path.is_dir():  # a sharded checkpoint of trainer.strategy=torchrec
        checkpoint = load_meta(path)
    elif path.is_file():
        checkpoint = load_weights_only(path)
    else:
        raise FileNotFoundError(f"ckpt_path={path} does not exist; pass a training checkpoint")
    overrides = {"data_dir": str(cfg.paths.data_dir), "cache_dir": str(cfg.paths.cache_dir)}
    if cfg.get("data") is not None:
        overrides.update(OmegaConf.to_container(cfg.data, resolve=True))
    if cfg.get("ranking") is not None:
        overrides["ranking"] = cfg.ranking
    try:
        dm = from_checkpoint(checkpoint, overrides, allow_new_data=cfg.get("allow_new_data", False))
    except DataMismatchError as e:
        raise DataMismatchError(f"{path}: {e}") from None
    dm.prepare_data()
    dm.setup("test")
    model = RecommenderModule(**checkpoint["hyper_parameters"])
    if path.is_dir() and unshard:
        state = {"state_dict": model.state_dict()}
        load_shards(state, path)  # every shard into the plain (unsharded) tables
        model.load_state_dict(state["state_dict"])
    elif path.is_file():
        model.load_state_dict(checkpoint["state_dict"])
    if model.spec != dm.spec:
        raise ValueError(
            f"the data ({dm.source}: {dm.spec.num_users} users, {dm.spec.num_items} items) "
            f"differs from the data {path} was trained on ({model.spec.num_users} users, "
            f"{model.spec.num_items} items): its embeddings do not fit these users and items"
        )
    return dm, model


@torch.inference_mode()
def request_latency(model: RecommenderModule, dm: RecDataModule, repeats: int) -> dict:
    """Latency of one recommendation request: build the batch of one user x every item and
    score it (``test/latency_p50_ms``, ``test/latency_p99_ms``)."""
    model.eval()
    items = torch.arange(dm.spec.num_items)
    users = torch.zeros_like(items)

    def request(_) -> torch.Tensor:
        return model(dm.data.features.make_batch(users, items))

    timing = latency_percentiles(request, None, warmup=5, repeats=repeats)
    return {f"test/latency_{k}": v for k, v in timing.items()}


def run(cfg: DictConfig) -> dict[str, float | str]:
    """Test the checkpoint (pointwise and, with ``data.ranking``, ranking metrics) beside the
    popularity baseline, time single requests, and report peak memory; print the table and
    write ``metrics.json`` in the run folder."""
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    # a sharded checkpoint under trainer=torchrec: the strategy loads each shard at test; under
    # another trainer its tables are gathered whole into one model
    sharded = Path(cfg.ckpt_path).is_dir() and isinstance(trainer.strategy, TorchRecStrategy)
    dm, model = load_checkpoint(cfg, unshard=not sharded)
    metrics = evaluate_with_baseline(trainer, model, dm, str(cfg.ckpt_path) if sharded else None)
    if not sharded:  # a sharded model scores collectively: no single-request timing
        metrics.update(request_latency(model, dm, repeats=cfg.latency_repeats))
    metrics["test/peak_memory_mb"] = peak_memory_mb()
    metrics["ckpt_path"] = str(cfg.ckpt_path)
    report(metrics, Path(cfg.paths.output_dir))
    return metrics
