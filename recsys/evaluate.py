"""Evaluation of a checkpoint: rebuild its model and data, test, report."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recsys.baselines import evaluate_with_baseline
from recsys.data.base import RecDataModule
from recsys.distributed.torchrec_strategy import TorchRecStrategy, load_meta, load_weights_only
from recsys.lit.module import RecommenderModule
from recsys.metrics.ranking import latency_percentiles, peak_memory_mb
from recsys.train import report

log = logging.getLogger(__name__)


def load_checkpoint(cfg: DictConfig) -> tuple[RecDataModule, RecommenderModule]:
    """The model of ``cfg.ckpt_path`` and its data module (prepared and set up).

    The data config saved in the checkpoint is used with this run's ``paths`` (data and cache
    folders) and the changes in ``cfg.data`` (and ``cfg.ranking`` when set). Checkpoints are
    read with ``weights_only=True``: one from elsewhere never runs code here.
    """
    path = Path(cfg.ckpt_path)
    if path.is_dir():  # a sharded checkpoint of trainer.strategy=torchrec: weights load at test
        checkpoint = load_meta(path)
    elif path.is_file():
        checkpoint = load_weights_only(path)
    else:
        raise FileNotFoundError(f"ckpt_path={path} does not exist; pass a training checkpoint")
    data_cfg = checkpoint.get("data_config")
    if data_cfg is None:
        raise ValueError(f"{path} holds no data config: it was not written by recsys train.py")
    for key in ("data_dir", "cache_dir"):
        if key in data_cfg:
            data_cfg[key] = str(cfg.paths[key])
    if cfg.get("data") is not None:
        data_cfg.update(OmegaConf.to_container(cfg.data, resolve=True))
    if cfg.get("ranking") is not None:
        data_cfg["ranking"] = cfg.ranking
    dm: RecDataModule = instantiate(data_cfg)
    dm.prepare_data()
    dm.setup("test")
    if path.is_dir():
        model = RecommenderModule(**checkpoint["hyper_parameters"])
    else:
        model = RecommenderModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    if model.spec != dm.spec:
        raise ValueError(
            f"the data ({dm.source}: {dm.spec.num_users} users, {dm.spec.num_items} items) "
            f"differs from the data {path} was trained on ({model.spec.num_users} users, "
            f"{model.spec.num_items} items); point paths.data_dir at the same files"
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
    dm, model = load_checkpoint(cfg)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    sharded = Path(cfg.ckpt_path).is_dir()  # the strategy loads its shards at test
    if sharded and not isinstance(trainer.strategy, TorchRecStrategy):
        raise ValueError(f"{cfg.ckpt_path} is a sharded checkpoint: add trainer=torchrec")
    metrics = evaluate_with_baseline(trainer, model, dm, str(cfg.ckpt_path) if sharded else None)
    if not sharded:  # a sharded model scores collectively: no single-request timing
        metrics.update(request_latency(model, dm, repeats=cfg.latency_repeats))
    metrics["test/peak_memory_mb"] = peak_memory_mb()
    metrics["ckpt_path"] = str(cfg.ckpt_path)
    report(metrics, Path(cfg.paths.output_dir))
    return metrics
