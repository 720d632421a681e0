"""Small building blocks shared by the models."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp(in_features: int, layers: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear -> ReLU (-> Dropout) for each width in ``layers``; [B, in] -> [B, layers[-1]]."""
    blocks: list[nn.Module] = []
    for width in layers:
        blocks += [nn.Linear(in_features, width), nn.ReLU()]
        if dropout > 0:
            blocks.append(nn.Dropout(dropout))
        in_features = width
    return nn.Sequential(*blocks)
