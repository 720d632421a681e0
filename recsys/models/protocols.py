"""What a network can do beyond ``forward``, as typed protocols: the LightningModule, the
catalogue scorer and the recommender test a network with ``isinstance(net, Protocol)`` and use
what it declares."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from recsys.data.batch import Batch


@runtime_checkable
class Factorised(Protocol):
    """A network whose logit can factor into a user part and an item part
    (`recsys.scoring.CatalogueScorer` scores whole catalogues with matrix products)."""

    #: whether it does with this network's settings (Hybrid: not with side features)
    factorised: bool

    def item_part(self) -> dict:
        """What scoring needs of the items, computed once per scorer."""
        ...

    def score_catalogue(self, users: torch.Tensor, item_part: dict) -> torch.Tensor:
        """Logits [U, I] of users [U] against every item, the same function as ``forward``."""
        ...


@runtime_checkable
class ItemEmbeddings(Protocol):
    """A network with a vector per item (the recommender's similar items)."""

    def item_embeddings(self) -> torch.Tensor:
        """Item vectors [num_items, D]."""
        ...


@runtime_checkable
class EmbeddingPenalty(Protocol):
    """A network with an L2 penalty on the embedding rows a batch looks up (``model.l2``)."""

    def embedding_l2(self, batch: Batch) -> torch.Tensor:
        """The penalty of the batch [scalar]."""
        ...


@runtime_checkable
class SparseGrad(Protocol):
    """A network whose tables may take row-sparse gradients (``model.sparse_grad``), which
    need a ``model.sparse_optimizer``."""

    sparse_grad: bool


@runtime_checkable
class Pretrainable(Protocol):
    """A network that may start from the weights of other runs' checkpoints. The
    LightningModule reads the files when a fit starts, checks that each is a checkpoint of
    the network that `source_hparams` names, and hands the networks' weights to
    `load_pretrained`."""

    #: source name -> checkpoint path, e.g. ``{"gmf": ..., "mlp": ...}``; None: from scratch
    pretrained: Mapping[str, str] | None

    def source_hparams(self, source: str) -> dict[str, Any]:
        """The hyperparameters that the checkpoint of ``source`` must have, e.g.
        ``{"net": "recsys.models.NeuMF", "variant": "gmf"}``."""
        ...

    def load_pretrained(self, weights: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Initialise from each source's network weights (its state_dict, ``net.`` removed)."""
        ...
