"""Item-item models fitted in closed form on the training interactions: EASE (Steck 2019) and
ItemKNN (item-item cosine with shrinkage, k neighbours).

Both score a (user, item) pair as ``sum over j in the user's training items of W[j, item]``
with an item-item weight matrix W [I, I]: EASE's solution of a ridge regression of each item
on the others, ItemKNN's shrunk cosine similarities kept for each item's k nearest neighbours.
They take no gradient steps (`recsys.models.common.ClosedForm`): `fit` computes W from the
training (user, item) pairs, and W and the users' training items are buffers, so a checkpoint
reloads them fitted. Their score is a ranking score, not a logit: they report ranking metrics
and AUROC, no log loss.
"""

from __future__ import annotations

import torch

from recsys.data.batch import Batch
from recsys.data.spec import FeatureSpec
from recsys.data.store import ragged_gather
from recsys.models.common import ClosedForm, require_ids


class ItemItem(ClosedForm):
    """The scoring shared by `EASE` and `ItemKNN`: the users' training items (CSR buffers
    ``offsets`` [U + 1] and ``history`` [nnz]) and the weights ``W`` [I, I]."""

    # the score of users against every item is X_u W: `recsys.scoring.CatalogueScorer`
    factorised = True

    def __init__(self, spec: FeatureSpec, sparse_grad: bool = False):
        super().__init__()
        require_ids(spec, type(self).__name__)
        if sparse_grad:
            raise ValueError(
                f"model.sparse_grad=true: {type(self).__name__} is fitted in closed form and "
                "has no tables to update; set model.sparse_grad=false"
            )
        self.num_users, self.num_items = spec.num_users, spec.num_items
        self.register_buffer("offsets", torch.zeros(spec.num_users + 1, dtype=torch.long))
        self.register_buffer("history", torch.zeros(0, dtype=torch.long))
        self.register_buffer("W", torch.zeros(spec.num_items, spec.num_items))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the number of training pairs is the checkpoint's: take its size before loading
        saved = state_dict.get(prefix + "history")
        if saved is not None:
            self.history = torch.zeros_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fit(self, users: torch.Tensor, items: torch.Tensor) -> ItemItem:
        """Fit on the training pairs (int64 codes [N] each; repeated pairs count once)."""
        keys = torch.unique(users * self.num_items + items)  # sorted by user, then item
        users, items = keys // self.num_items, keys % self.num_items
        counts = torch.bincount(users, minlength=self.num_users)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        self.history = items
        x = torch.zeros(self.num_users, self.num_items, dtype=torch.float64)
        x[users, items] = 1.0
        self.W = self.weights(x).float()
        return self

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """W [I, I] from the user x item matrix ``x`` [U, I] of 0/1 (float64)."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> torch.Tensor:
        """Scores [B]: each pair's sum of W[j, item] over the user's training items j."""
        users, items = batch.ids("user_id"), batch.ids("item_id")
        lengths, history = ragged_gather(self.offsets, self.history, users)
        pair = torch.repeat_interleave(torch.arange(len(users)), lengths)
        scores = torch.zeros(len(users), dtype=self.W.dtype)
        return scores.index_add_(0, pair, self.W[history, items[pair]])

    def item_part(self) -> dict:
        """What scoring every item needs: the weights W [I, I]."""
        return {"W": self.W}

    def score_catalogue(self, users: torch.Tensor, item_part: dict) -> torch.Tensor:
        """Scores [U, I] of users [U] against every item: X_u W."""
        lengths, history = ragged_gather(self.offsets, self.history, users)
        rows = torch.repeat_interleave(torch.arange(len(users)), lengths)
        x = torch.zeros(len(users), self.num_items, dtype=item_part["W"].dtype)
        x[rows, history] = 1.0
        return x @ item_part["W"]


class EASE(ItemItem):
    """EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019).

    With G = X^T X + l2_reg I and P = G^-1: W = I - P diag(1 / diag(P)), i.e. W[i, j] =
    -P[i, j] / P[j, j] off the diagonal and 0 on it: the least-squares weights that predict
    each item's column of X from the other items', with an L2 penalty of ``l2_reg``. Memory and
    time: an [I, I] matrix and its inverse, so catalogues of tens of thousands of items.

    Example::

            >>> import torch
            >>> from recsys.data import FeatureSpec
            >>> from recsys.data.store import FeatureStore
            >>> spec = FeatureSpec.of_ids(num_users=3, num_items=4)
            >>> users, items = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 0, 2])
            >>> net = EASE(spec, l2_reg=1.0).fit(users, items)
            >>> pairs = torch.tensor([1, 1]), torch.tensor([1, 3])  # user 1 has item 0
            >>> scores = net(FeatureStore(spec, None, None).make_batch(*pairs))
            >>> bool(scores[0] > scores[1])  # item 1 goes with item 0; item 3 with none
            True
    """

    def __init__(self, spec: FeatureSpec, l2_reg: float = 500.0, **kwargs):
        super().__init__(spec, **kwargs)
        if l2_reg <= 0:
            raise ValueError(f"model.l2_reg={l2_reg}: EASE's regularisation must be > 0")
        self.l2_reg = l2_reg

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        gram = x.T @ x
        gram.diagonal().add_(self.l2_reg)
        p = torch.linalg.inv(gram)
        w = -p / p.diagonal()
        w.fill_diagonal_(0.0)
        return w


class ItemKNN(ItemItem):
    """Item-based k nearest neighbours with cosine similarity and shrinkage.

    sim(i, j) = |U_i ∩ U_j| / (sqrt(|U_i| |U_j|) + shrink) for items i != j, with U_i the
    users who have item i (the cosine of the items' columns of X, shrunk towards 0 when the
    items have few users). Each item keeps its ``k`` most similar items (ties: the lower
    item code); W[j, i] = sim(j, i) for j among item i's neighbours, else 0.

    Example::

            >>> import torch
            >>> from recsys.data import FeatureSpec
            >>> spec = FeatureSpec.of_ids(num_users=3, num_items=3)
            >>> users, items = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 0, 1, 2])
            >>> net = ItemKNN(spec, k=1).fit(users, items)
            >>> net.W.nonzero().tolist()  # items 0 and 1 share their users; item 2 shares none
            [[0, 1], [1, 0]]
    """

    def __init__(self, spec: FeatureSpec, k: int = 100, shrink: float = 10.0, **kwargs):
        super().__init__(spec, **kwargs)
        if k < 1 or shrink < 0:
            raise ValueError(f"model.k={k} must be >= 1 and model.shrink={shrink} >= 0")
        self.k, self.shrink = k, shrink

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        overlap = x.T @ x
        norms = overlap.diagonal().sqrt()
        sim = overlap / (norms[:, None] * norms[None, :] + self.shrink)
        sim.fill_diagonal_(0.0)
        k = min(self.k, self.num_items - 1)
        # each item's (column's) k largest, by a stable sort so ties keep the lower code
        order = torch.sort(sim, dim=0, descending=True, stable=True).indices[:k]
        keep = torch.zeros_like(sim, dtype=torch.bool)
        keep.scatter_(0, order, True)
        return torch.where(keep & (sim > 0), sim, torch.zeros_like(sim))
