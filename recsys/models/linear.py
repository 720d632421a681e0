"""Logistic regression over every feature: the strong simple baseline for click logs."""

from __future__ import annotations

import torch
from torch import nn

from recsys.data.batch import Batch
from recsys.data.spec import FeatureSpec
from recsys.models.dlrm import embedding_bags


class LogisticRegression(nn.Module):
    """logit = b + sum over sparse features f of sum of w_f[code] + v . dense.

    Notation: B batch size, F sparse features, Dd dense features.

    Reads every feature of the spec: the ids, the users' and items' side features and the
    row's own (a click log's), sparse and dense. Each sparse feature has one weight per code
    (a table of dimension 1; a multi-hot feature sums its codes' weights), the dense features
    one linear layer, and there is one bias. The weights start at zero (logit 0).

    ``sparse_grad``: the tables' gradients are row-sparse (their ``nn.EmbeddingBag`` modules
    with ``sparse=True``), for an optimizer that takes them (``model.sparse_optimizer``:
    Adagrad does): a step's cost then depends on the batch, not on the tables' sizes.

    Example::

            >>> import torch
            >>> from recsys.data import FeatureSpec
            >>> from recsys.data.store import FeatureStore
            >>> spec = FeatureSpec.of_ids(num_users=10, num_items=20)
            >>> users, items = torch.tensor([0, 3]), torch.tensor([5, 7])
            >>> batch = FeatureStore(spec, None, None).make_batch(users, items)
            >>> LogisticRegression(spec)(batch)  # logits [B]
            tensor([0., 0.], grad_fn=<AddBackward0>)
    """

    def __init__(self, spec: FeatureSpec, sparse_grad: bool = False):
        super().__init__()
        if not spec.sparse and not spec.dense:
            raise ValueError("model=logreg needs at least one feature; the spec has none")
        self.sparse_grad = sparse_grad
        self.weights = embedding_bags(spec, embedding_dim=1, pooling="sum") if spec.sparse else None
        for table in self.weights.embedding_bags.values() if self.weights is not None else ():
            table.sparse = sparse_grad
            if table.weight.device.type != "meta":
                nn.init.zeros_(table.weight)
        self.dense = nn.Linear(spec.num_dense, 1, bias=False) if spec.num_dense else None
        if self.dense is not None:
            nn.init.zeros_(self.dense.weight)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns: logits [B]."""
        logit = self.bias.expand(len(batch))
        if self.weights is not None:
            logit = logit + self.weights(batch.sparse_features).values().sum(dim=1)  # [B, F]
        if self.dense is not None:
            logit = logit + self.dense(batch.dense_features).squeeze(1)
        return logit
