"""Non-learned baselines, scored by the same LightningModule code as the models."""

from __future__ import annotations

import lightning as L

from recsys.data.artifact import ArtifactDataModule
from recsys.lit.module import RecommenderModule
from recsys.loggers import nested_run


def popularity_module(dm: ArtifactDataModule, like: RecommenderModule) -> RecommenderModule:
    """The popularity baseline (items ranked by training interactions, Platt-scaled into
    probabilities on the training examples: `item_label_counts`), evaluated with the ranking
    settings of ``like`` and reporting its figures (beside a BPR model, no logloss or
    accuracy); its test metrics are named ``popularity/test/...``."""
    dm.setup("test")  # a no-op unless the data was only set up in spawned processes
    module = RecommenderModule(
        net="recsys.models.Popularity",
        spec=dm.spec.to_dict(),
        loss=like.hparams.loss,
        ranking_ks=like.hparams.ranking_ks,
        list_k=like.hparams.list_k,
    )
    statistics = dm.protocol.item_statistics()
    module.set_item_statistics(**statistics)
    module.net.fit(statistics["popularity"], *dm.item_label_counts())
    module.metric_prefix = "popularity/"
    return module


def evaluate_with_baseline(
    trainer: L.Trainer, model: RecommenderModule, dm: ArtifactDataModule, ckpt_path: str | None
) -> dict[str, float]:
    """Test ``model`` (from ``ckpt_path`` when given), then the popularity baseline on the same
    pairs and candidates; returns both sets of metrics and the test split's cold-start counts.
    The baseline is logged as the part ``popularity`` of the run (`nested_run`: under MLflow a
    run of its own, nested under the model's)."""
    trainer.test(model, datamodule=dm, ckpt_path=ckpt_path, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if not dm.spec.has_ids:  # no items to be popular
        return metrics
    baseline = popularity_module(dm, model)
    with nested_run(trainer, baseline, "popularity"):
        trainer.test(baseline, datamodule=dm, verbose=False)
    metrics.update(
        {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("popularity/")}
    )
    # the test rows whose user or item has no training row (and those left out, if any)
    metrics.update({f"test/{k}": int(v) for k, v in dm.cold_rows["test"].items()})
    return metrics
