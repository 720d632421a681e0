"""Non-learned baselines scored on the same splits as the models."""

from __future__ import annotations

from torchmetrics.functional.classification import binary_auroc

from recsys.data.base import RecDataModule


def popularity_auroc(dm: RecDataModule, split: str = "test") -> float:
    """AUROC of scoring each (user, item) pair of ``split`` by the item's training popularity."""
    pairs = dm.eval_pairs(split)
    scores = dm.item_popularity()[pairs.items]
    return float(binary_auroc(scores, pairs.labels.long()))
