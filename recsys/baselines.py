"""Non-learned baselines scored on the same splits as the models."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import binary_auroc

from recsys.data.base import RecDataModule


def item_popularity(dm: RecDataModule) -> torch.Tensor:
    """Training interactions per item [num_items]: the popularity score of each item."""
    inter, rows = dm.data.interactions, dm.rows["train"]
    return torch.bincount(inter.items[rows], minlength=dm.spec.num_items).float()


def popularity_auroc(dm: RecDataModule, split: str = "test") -> float:
    """AUROC of scoring each (user, item) pair of ``split`` by the item's training popularity."""
    pairs = dm.eval_pairs(split)
    scores = item_popularity(dm)[pairs.items]
    return float(binary_auroc(scores, pairs.labels.long()))
