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
    """AUROC of scoring each (user, item) row of ``split`` by the item's training popularity."""
    inter, rows = dm.data.interactions, dm.rows[split]
    scores = item_popularity(dm)[inter.items[rows]]
    return float(binary_auroc(scores, inter.labels[rows].long()))
