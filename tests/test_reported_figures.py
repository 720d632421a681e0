"""Reported figures mean what their names say: the epoch's training loss, diversity."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lightning.pytorch.callbacks import Callback

from recsys.callbacks import ValidationHistory
from recsys.train import build, run


class BatchLosses(Callback):
    """Each training batch's loss as Lightning computed it, and the batch's size. Lightning
    hands on the step's output divided by ``trainer.accumulate_grad_batches``."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.sizes: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)
        self.sizes.append(len(batch))


@pytest.mark.parametrize(("accumulate", "max_steps"), [(2, 7), (3, 5)])
def test_train_loss_under_max_steps_and_accumulation(make_cfg, accumulate, max_steps):
    """A fit that ``trainer.max_steps`` ends mid-epoch, with gradient accumulation, logs as
    ``train/loss`` the mean by sample of the loss over every batch it trained on."""
    cfg = make_cfg(
        "data=movielens",
        "data.variant=100k",
        "data.batch_size=2048",  # 40 batches an epoch: the fit ends inside the first
        f"trainer.max_steps={max_steps}",
        f"+trainer.accumulate_grad_batches={accumulate}",
        "+trainer.num_sanity_val_steps=0",
        "callbacks=none",
    )
    dm, model, trainer = build(cfg)
    batches = BatchLosses()
    trainer.callbacks.append(batches)
    trainer.fit(model, datamodule=dm)

    assert len(batches.losses) == accumulate * max_steps
    expected = np.average(batches.losses, weights=batches.sizes)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(expected, rel=1e-6)
    history = next(c for c in trainer.callbacks if isinstance(c, ValidationHistory))
    assert history.train_epochs[0]["train/loss"] == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def ml100k_csv(data_dir, tmp_path_factory):
    """ml-100k's ratings as a CSV file: the same interactions, no genres."""
    ratings = pd.read_csv(
        data_dir / "ml-100k" / "u.data",
        sep="\t",
        names=["user_id", "item_id", "rating", "timestamp"],
    )
    path = tmp_path_factory.mktemp("ml100k_csv") / "ratings.csv"
    ratings.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("data", ["movielens", "csv"])
def test_diversity_only_on_the_items_shared_features(make_cfg, ml100k_csv, data):
    """Intra-list diversity is measured on the items' genres, the same vectors for the model
    and the popularity baseline; data without a multi-hot item feature has no shared item
    space, and no model reports diversity on it (each model's own embeddings gave popularity,
    whose one-number "embedding" has one direction, a diversity of 0)."""
    source = (
        ["data=movielens", "data.variant=100k"]
        if data == "movielens"
        else ["data=csv", f"data.path={ml100k_csv}"]
    )
    metrics = run(make_cfg(*source, "data.ranking=full", "model.variant=gmf", "debug=fdr"))
    for prefix in ("", "popularity/"):
        assert f"{prefix}test/coverage@10" in metrics
        assert (f"{prefix}test/diversity@10" in metrics) == (data == "movielens"), prefix
    if data == "movielens":  # genres: the popular items' lists differ too
        assert metrics["popularity/test/diversity@10"] > 0.5
