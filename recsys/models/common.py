"""Small building blocks shared by the models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
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


def mlp_rest(first_out: torch.Tensor, layers: nn.Sequential) -> torch.Tensor:
    """An `mlp` from the output of its first Linear on: [..., H1] -> [..., layers[-1]].

    For scoring in eval mode (dropout off): the ReLUs run in place on fresh tensors and each
    Linear is one ``addmm``, so the large [U, I, H] activations of catalogue scoring are
    written once per layer. ``first_out`` is overwritten.
    """
    shape = first_out.shape[:-1]
    h = first_out.reshape(-1, first_out.shape[-1]).relu_()
    for layer in [m for m in layers if isinstance(m, nn.Linear)][1:]:
        h = torch.addmm(layer.bias, h, layer.weight.T).relu_()
    return h.view(*shape, h.shape[-1])
