"""Evaluation of a checkpoint: rebuild its model and data, test, report."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from recsys.baselines import evaluate_with_baseline
from recsys.checkpoint import checkpoint_from_config
from recsys.console import describe, quiet_libraries
from recsys.data.artifact import ArtifactDataModule
from recsys.distributed import TorchRecStrategy
from recsys.lit.module import RecommenderModule
from recsys.metrics.ranking import latency_percentiles, peak_memory_mb
from recsys.runs import load_checkpoint, model_context, report, write_test_results
from recsys.scoring import CatalogueScorer, servable

log = logging.getLogger(__name__)


def request_latency(model: RecommenderModule, dm: ArtifactDataModule, repeats: int) -> dict:
    """Latency of one recommendation request as serving answers it (`CatalogueScorer`): one
    user's top-10 among every item, known items excluded (``test/latency_p50_ms``,
    ``test/latency_p99_ms``)."""
    scorer = CatalogueScorer(model.net, dm.data.features, dm.spec.num_items)
    user, k = torch.zeros(1, dtype=torch.long), min(10, dm.spec.num_items)

    def request(_) -> tuple[torch.Tensor, torch.Tensor]:
        return scorer.top_k(user, k, dm.positives)

    timing = latency_percentiles(request, None, warmup=5, repeats=repeats)
    return {f"test/latency_{k}": v for k, v in timing.items()}


def run(cfg: DictConfig) -> dict[str, float | str]:
    """Test the checkpoint (pointwise and, with ``data.ranking``, ranking metrics) beside the
    popularity baseline, time single requests, and report peak memory; print the table and
    write ``metrics.json`` in the run folder."""
    quiet_libraries()
    cfg.ckpt_path = checkpoint_from_config(cfg)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    # a sharded checkpoint under trainer=torchrec: the strategy loads each shard at test; under
    # another trainer its tables are gathered whole into one model
    sharded = Path(cfg.ckpt_path).is_dir() and isinstance(trainer.strategy, TorchRecStrategy)
    with model_context(trainer) if sharded else nullcontext():  # tables on meta until sharded
        dm, model = load_checkpoint(cfg, unshard=not sharded)
    if dm.feedback == "explicit" and dm.protocol.ranking == "full":
        log.warning(
            "full ranking of a model trained on explicit feedback: it learned which rated items "
            "a user rates highly, not which items a user rates at all, so it may rank the whole "
            "catalogue below popularity; train with data.feedback=implicit to rank"
        )
    metrics = evaluate_with_baseline(trainer, model, dm, str(cfg.ckpt_path) if sharded else None)
    # a sharded model scores collectively: no single-request timing
    if not sharded and not servable(dm.spec):
        log.info(
            "no request latency: this data has %s, so no recommendation request is served "
            "from it (the figures are pointwise, on the test rows)",
            "no user or item ids" if not dm.spec.has_ids else "row features",
        )
    elif not sharded:
        metrics.update(request_latency(model, dm, repeats=cfg.latency_repeats))
    metrics["test/peak_memory_mb"] = peak_memory_mb()
    metrics["ckpt_path"] = str(cfg.ckpt_path)
    report(metrics, Path(cfg.paths.output_dir), [describe(dm, model), f"tested: {cfg.ckpt_path}"])
    write_test_results(model, dm, Path(cfg.paths.output_dir), str(cfg.ckpt_path))
    return metrics
