"""Matrix factorisation: the dot-product baseline of Rendle et al. (RecSys 2020)."""

from __future__ import annotations

import torch
from torch import nn

from recsys.data.batch import Batch
from recsys.data.spec import FeatureSpec
from recsys.models import ops
from recsys.models.common import rename_keys, require_ids
from recsys.models.ops import Ids

# state_dict names of NeuMF's ``mf`` variant, which this model was before -> today's
LEGACY_NAMES = ((r"^gmf_(user|item)\.", r"\1."),)


class MF(nn.Module):
    """logit = p_u . q_i + b_u + b_i + b over the ``user_id`` and ``item_id`` of a `Batch`.

    Notation: B batch size, D embedding dim; p_u, q_i in R^D. ``biases=False`` drops the user
    and item biases b_u and b_i (the global bias b stays). Reads the ids only; refuses data
    without them (`require_ids`).

    ``sparse_grad``: the tables' gradients are row-sparse, one row per distinct user or item
    of the batch, in order (`ops.rows`), for an optimizer that takes them
    (``model.sparse_optimizer``, e.g. `recsys.lit.optim.RowSparseAdam`).

    Example::

            >>> import torch
            >>> from recsys.data import FeatureSpec
            >>> from recsys.data.store import FeatureStore
            >>> spec = FeatureSpec.of_ids(num_users=10, num_items=20)
            >>> users, items = torch.tensor([0, 3]), torch.tensor([5, 7])
            >>> batch = FeatureStore(spec, None, None).make_batch(users, items)
            >>> MF(spec, embedding_dim=8)(batch).shape  # logits [B]
            torch.Size([2])
    """

    factorised = True  # `CatalogueScorer`: a dot product plus an item term

    def __init__(
        self,
        spec: FeatureSpec,
        embedding_dim: int = 32,
        biases: bool = True,
        sparse_grad: bool = False,
    ):
        super().__init__()
        require_ids(spec, "mf")
        self.sparse_grad = sparse_grad
        self.bias = nn.Parameter(torch.zeros(()))
        self.user = nn.Embedding(spec.num_users, embedding_dim, sparse=sparse_grad)
        self.item = nn.Embedding(spec.num_items, embedding_dim, sparse=sparse_grad)
        self.user_bias = nn.Embedding(spec.num_users, 1, sparse=sparse_grad) if biases else None
        self.item_bias = nn.Embedding(spec.num_items, 1, sparse=sparse_grad) if biases else None
        # the bias tables are drawn, then zeroed: a seed gives the weights and the random
        # stream that it gave NeuMF's ``mf`` variant
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.01)
        for table in (self.user_bias, self.item_bias):
            if table is not None:
                nn.init.zeros_(table.weight)

    def tables(self, side: str) -> list[nn.Embedding]:
        """The ``user`` or ``item`` side's tables: vectors, then biases (when there are)."""
        tables = [self.user, self.user_bias] if side == "user" else [self.item, self.item_bias]
        return [t for t in tables if t is not None]

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns: logits [B]."""
        users = Ids.of(batch.ids("user_id"), self.sparse_grad)
        items = Ids.of(batch.ids("item_id"), self.sparse_grad)
        logits = (ops.rows(self.user, users) * ops.rows(self.item, items)).sum(1) + self.bias
        if self.user_bias is not None:
            user_bias, item_bias = ops.rows(self.user_bias, users), ops.rows(self.item_bias, items)
            logits = logits + user_bias[:, 0] + item_bias[:, 0]
        return logits

    def embedding_l2(self, batch: Batch) -> torch.Tensor:
        """The L2 penalty of the rows the batch looks up [scalar]: the mean over its pairs of
        the squared norms of each pair's user and item vectors and biases (as `NeuMF`'s,
        Rendle et al. 2020's regularisation, their ``reg`` twice ``model.l2``)."""
        penalty = ops.squared_norms(self.tables("user"), batch.ids("user_id"))
        penalty += ops.squared_norms(self.tables("item"), batch.ids("item_id"))
        return torch.stack(penalty).sum() / len(batch)

    def item_embeddings(self) -> torch.Tensor:
        """Item vectors [num_items, D]."""
        return self.item.weight

    def item_part(self) -> dict:
        """The item vectors [I, D] and the item biases plus the global bias [I]."""
        bias = self.bias.expand(self.item.num_embeddings)
        if self.item_bias is not None:
            bias = bias + self.item_bias.weight[:, 0]
        return {"dot": self.item.weight, "item_bias": bias}

    def score_catalogue(self, users: torch.Tensor, item_part: dict) -> torch.Tensor:
        """Logits [U, I] of users [U] against every item, the same function as `forward`."""
        logits = self.user.weight[users] @ item_part["dot"].T + item_part["item_bias"]
        if self.user_bias is not None:
            logits = logits + self.user_bias.weight[users]
        return logits

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        rename_keys(state_dict, LEGACY_NAMES, prefix)  # checkpoints of NeuMF variant mf
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
