"""The popularity baseline as a model, so the same evaluation code scores it."""

from __future__ import annotations

import torch
from torch import nn

from recsys.data.batch import Batch
from recsys.data.spec import FeatureSpec


class Popularity(nn.Module):
    """Scores a (user, item) pair by the item's training popularity: log(1 + count).

    Not trained: call ``fit(counts)`` with the training interactions per item [num_items].
    """

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        self.register_buffer("counts", torch.zeros(spec.num_items))

    def fit(self, counts: torch.Tensor) -> Popularity:
        self.counts.copy_(counts)
        return self

    def item_embeddings(self) -> torch.Tensor:
        """[num_items, 1] log popularity (the model has no other item vector)."""
        return torch.log1p(self.counts)[:, None]

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns: scores [B]."""
        return torch.log1p(self.counts[batch.ids("item_id")])
