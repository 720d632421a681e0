"""The one batch type that every dataset produces and every model consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Batch:
    """A whole batch of user-item interactions.

    Notation: B batch size, Dd number of dense features.

    Attributes:
        dense_features: float tensor [B, Dd] (Dd may be 0).
        sparse_features: `KeyedJaggedTensor` with one key per sparse feature of the dataset's
            `FeatureSpec` (``user_id`` and ``item_id`` first), each of stride B; multi-hot
            features have variable lengths.
        labels: float tensor [B] of 0/1 targets.
        num_negatives: n > 0 when the batch is in the negative-sampling layout (B / (1 + n)
            positives first, then n sampled negatives per positive: what BPR pairs), 0 for
            plain rows. A number on the host, so a loss reads the layout without reading the
            labels back from the device.
    """

    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor
    num_negatives: int = 0

    def __len__(self) -> int:
        return self.labels.shape[0]

    def ids(self, key: str) -> torch.Tensor:
        """Values of a single-valued sparse feature, e.g. ``batch.ids("user_id")`` -> [B]."""
        return self.sparse_features[key].values()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            num_negatives=self.num_negatives,
        )

    def pin_memory(self) -> Batch:
        return Batch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            num_negatives=self.num_negatives,
        )
