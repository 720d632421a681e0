"""Non-learned baselines, scored by the same LightningModule code as the models."""

from __future__ import annotations

import lightning as L

from recsys.data.base import RecDataModule
from recsys.lit.module import RecommenderModule


def popularity_module(dm: RecDataModule, like: RecommenderModule) -> RecommenderModule:
    """The popularity baseline (items scored by training interactions), evaluated with the
    ranking settings of ``like``; its test metrics are named ``popularity/test/...``."""
    dm.setup("test")  # a no-op unless the data was only set up in spawned processes
    module = RecommenderModule(
        net="recsys.models.Popularity",
        spec=dm.spec.to_dict(),
        ranking_ks=like.hparams.ranking_ks,
        list_k=like.hparams.list_k,
    )
    module.net.fit(dm.item_popularity())
    module.metric_prefix = "popularity/"
    return module


def evaluate_with_baseline(
    trainer: L.Trainer, model: RecommenderModule, dm: RecDataModule, ckpt_path: str | None
) -> dict[str, float]:
    """Test ``model`` (from ``ckpt_path`` when given), then the popularity baseline on the same
    pairs and candidates; returns both sets of metrics."""
    trainer.test(model, datamodule=dm, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    trainer.test(popularity_module(dm, model), datamodule=dm)
    metrics.update(
        {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("popularity/")}
    )
    return metrics
