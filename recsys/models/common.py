"""Small building blocks shared by the models."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from recsys.data.spec import FeatureSpec
from recsys.errors import InputError


def require_ids(spec: FeatureSpec, model: str) -> None:
    """Raise `InputError` when ``spec`` has no user and item ids (`FeatureSpec.has_ids`),
    which ``model`` (its config name, e.g. ``ncf``) needs."""
    if not spec.has_ids:
        raise InputError(
            f"model={model} needs user and item ids; the data has none (every feature belongs "
            "to the row, as in data=criteo's click logs): use model=dlrm or model=logreg"
        )


class ClosedForm(nn.Module):
    """A network fitted in closed form on the training (user, item) pairs, not by gradient
    steps (`recsys.models.EASE`, `recsys.models.ItemKNN`): `recsys.train.build` calls `fit`
    before the Trainer starts, and the LightningModule then takes no optimizer step. Its
    scores rank items; they are no logits of a probability."""

    def fit(self, users: torch.Tensor, items: torch.Tensor) -> ClosedForm:
        """Fit on the training pairs (int64 codes [N] each)."""
        raise NotImplementedError


def host_reads_are_free(t: torch.Tensor) -> bool:
    """Whether ops whose output size depends on the data (``torch.unique``, boolean masks) are
    cheap where ``t`` lives: on the CPU. On an accelerator they wait for the device, so the
    models take a path without them there (the tests switch this off to check that path)."""
    return not t.is_cuda


def mlp(in_features: int, layers: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear -> ReLU (-> Dropout) for each width in ``layers``; [B, in] -> [B, layers[-1]]."""
    blocks: list[nn.Module] = []
    for width in layers:
        blocks += [nn.Linear(in_features, width), nn.ReLU()]
        if dropout > 0:
            blocks.append(nn.Dropout(dropout))
        in_features = width
    return nn.Sequential(*blocks)


# (W^T [in, out], b [out]) per Linear
LayerWeights = list[tuple[torch.Tensor, torch.Tensor]]


def mlp_rest_weights(layers: nn.Sequential) -> LayerWeights:
    """(W^T [in, out], contiguous; b [out]) of each Linear of an `mlp` after the first: what
    `mlp_rest` multiplies by, computed once per scorer (a contiguous W^T multiplies faster
    than the ``weight.T`` view)."""
    linears = [m for m in layers if isinstance(m, nn.Linear)][1:]
    return [(m.weight.T.contiguous(), m.bias) for m in linears]


def mlp_rest(
    user_half: torch.Tensor, item_half: torch.Tensor, weights: LayerWeights
) -> torch.Tensor:
    """An `mlp` from the output of its first Linear on, for every (user, item) pair whose first
    layer output is ``user_half[u] + item_half[i]``: [U, H1] and [I, H1] -> [U * I, L], row
    u * I + i; ``weights`` from `mlp_rest_weights`.

    For scoring in eval mode (dropout off): the ReLUs run in place on fresh tensors and each
    Linear is one ``addmm``, so the large activations of catalogue scoring are written once
    per layer. One user's rows are a 2-D add (a few % faster than the broadcast over [U, I,
    H1]; NeuMF scores one user at a time on catalogues of thousands of items).
    """
    if len(user_half) == 1:
        h = (item_half + user_half).relu_()
    else:
        h = (user_half[:, None, :] + item_half).flatten(0, 1).relu_()
    for weight_t, bias in weights:
        h = torch.addmm(bias, h, weight_t).relu_()
    return h


def rename_keys(state_dict: dict, renames: Sequence[tuple[str, str]], prefix: str = "") -> dict:
    """Rename, in place, the entries of ``state_dict`` under ``prefix`` by the first of
    ``renames`` (regular expression, replacement) that matches the rest of their name: a
    model's ``_load_from_state_dict`` loads checkpoints of its earlier layouts through it.
    Returns ``state_dict``."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix) :]
        for pattern, replacement in renames:
            new, found = re.subn(pattern, replacement, name, count=1)
            if found:
                state_dict[prefix + new] = state_dict.pop(key)
                break
    return state_dict
