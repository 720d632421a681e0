"""The Hybrid recommender (brief 004): a dot product plus an MLP over user and item vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recsys.data.batch import Batch
from recsys.data.spec import FeatureSpec
from recsys.models.common import mlp, mlp_rest, mlp_rest_weights, require_ids
from recsys.models.dlrm import embedding_bags


class Hybrid(nn.Module):
    """logit = <u, i> + h . MLP([u; i (; dense)]).

    Notation: B batch size, D embedding dim, Dd dense features.

    u and i are the user and item embeddings [B, D]. With ``use_side_features``, the pooled
    embeddings of the user's side features (e.g. age, gender) are added to u, the item's (e.g.
    genres) to i, and the users' and items' dense features join the MLP input.

    Reads ``user_id`` and ``item_id``, and with ``use_side_features`` the users' and items'
    sparse and dense features; never the row's own features (`FeatureSpec.row_features`,
    ``spec.dense_of("row")``): u and i describe the user and the item, whatever the row.
    Refuses data without ids (`require_ids`).

    ``sparse_grad``: every table's gradient is row-sparse (``nn.Embedding`` and the side
    features' ``nn.EmbeddingBag`` with ``sparse=True``), one row per lookup, for an optimizer
    that takes such gradients (``model.sparse_optimizer``, e.g.
    `recsys.lit.optim.RowSparseAdam`): a step's cost then depends on the batch, not on the
    tables' sizes.

    Example::

            >>> import torch
            >>> from recsys.data import FeatureSpec
            >>> from recsys.data.store import FeatureStore
            >>> spec = FeatureSpec.of_ids(num_users=10, num_items=20)
            >>> users, items = torch.tensor([0, 3]), torch.tensor([5, 7])
            >>> batch = FeatureStore(spec, None, None).make_batch(users, items)
            >>> net = Hybrid(spec, embedding_dim=32, mlp_layers=[64, 32], use_side_features=True)
            >>> net(batch).shape  # logits [B]
            torch.Size([2])
    """

    def __init__(
        self,
        spec: FeatureSpec,
        embedding_dim: int = 32,
        mlp_layers: Sequence[int] = (64, 32),
        dropout: float = 0.0,
        use_side_features: bool = False,
        pooling: str = "mean",
        sparse_grad: bool = False,
    ):
        super().__init__()
        require_ids(spec, "hybrid")
        if not mlp_layers:
            raise ValueError("model.mlp_layers must name at least one layer")
        self.sparse_grad = sparse_grad
        self.user = nn.Embedding(spec.num_users, embedding_dim, sparse=sparse_grad)
        self.item = nn.Embedding(spec.num_items, embedding_dim, sparse=sparse_grad)
        nn.init.normal_(self.user.weight, std=0.01)
        nn.init.normal_(self.item.weight, std=0.01)
        side = spec.side_features() if use_side_features else ()
        self.side = (
            embedding_bags(spec, embedding_dim, pooling, features=[f.name for f in side])
            if side
            else None
        )
        for table in self.side.embedding_bags.values() if self.side is not None else ():
            table.sparse = sparse_grad
        self.user_side = [f.name for f in side if f.entity == "user"]
        self.item_side = [f.name for f in side if f.entity == "item"]
        # the users' and items' dense features: the leading columns of Batch.dense_features
        # (entity order, `FeatureSpec.of_ids`), the row's after them
        own = [d.entity != "row" for d in spec.dense]
        if own != sorted(own, reverse=True):
            raise ValueError(
                f"Hybrid needs the row's dense features after the users' and items' "
                f"(FeatureSpec.of_ids order); the spec has {[d.name for d in spec.dense]}"
            )
        self.num_dense = sum(own) if use_side_features else 0
        self.mlp = mlp(2 * embedding_dim + self.num_dense, mlp_layers, dropout)
        self.head = nn.Linear(mlp_layers[-1], 1)

    def item_embeddings(self) -> torch.Tensor:
        """Item id vectors [num_items, D]."""
        return self.item.weight

    @property
    def factorised(self) -> bool:
        """Whether the logit factors into user and item parts (`CatalogueScorer`): ids only."""
        return self.side is None and self.num_dense == 0

    def item_part(self) -> dict:
        """The item vectors [I, D], the item half of the first MLP layer [I, H1] and the later
        layers' weights (`mlp_rest_weights`)."""
        first, d = self.mlp[0], self.item.embedding_dim
        return {
            "dot": self.item.weight,
            "mlp": self.item.weight @ first.weight[:, d:].T,
            "mlp_rest": mlp_rest_weights(self.mlp),
        }

    def score_catalogue(self, users: torch.Tensor, item_part: dict):
        """Logits [U, I] of users [U] against every item (ids only, see `factorised`)."""
        first, d = self.mlp[0], self.user.embedding_dim
        u = self.user(users)
        user_half = u @ first.weight[:, :d].T + first.bias  # [U, H1]
        hidden = mlp_rest(user_half, item_part["mlp"], item_part["mlp_rest"])  # [U * I, L]
        return u @ item_part["dot"].T + self.head(hidden).view(len(users), -1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns: logits [B]."""
        u = self.user(batch.ids("user_id"))
        i = self.item(batch.ids("item_id"))
        if self.side is not None:
            pooled = self.side(batch.sparse_features).to_dict()  # name -> [B, D]
            u = u + sum((pooled[f] for f in self.user_side), torch.zeros_like(u))
            i = i + sum((pooled[f] for f in self.item_side), torch.zeros_like(i))
        mlp_in = [u, i, batch.dense_features[:, : self.num_dense]] if self.num_dense else [u, i]
        deep = self.head(self.mlp(torch.cat(mlp_in, dim=1))).squeeze(1)
        return (u * i).sum(dim=1) + deep
