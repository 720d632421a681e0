"""Neural Collaborative Filtering: GMF, MLP and their fusion NeuMF (He et al., WWW 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recsys.data.batch import Batch
from recsys.data.spec import FeatureSpec
from recsys.models.common import mlp, mlp_rest

VARIANTS = ("gmf", "mlp", "neumf")


class NeuMF(nn.Module):
    """NeuMF over the ``user_id`` and ``item_id`` features of a `Batch`.

    Notation: B batch size, G GMF embedding dim, M MLP embedding dim, L last MLP width.

    - ``gmf``: logit = h . (p_u * q_i) with p_u, q_i in R^G.
    - ``mlp``: logit = h . MLP([p_u; q_i]) with p_u, q_i in R^M.
    - ``neumf``: logit = h . [p_u * q_i; MLP([p'_u; q'_i])], separate embeddings per tower.

    Example::

            >>> import torch
            >>> from recsys.data import FeatureSpec
            >>> from recsys.data.store import FeatureStore
            >>> spec = FeatureSpec.of_ids(num_users=10, num_items=20)
            >>> users, items = torch.tensor([0, 3]), torch.tensor([5, 7])
            >>> batch = FeatureStore(spec, None, None).make_batch(users, items)
            >>> net = NeuMF(spec, variant="neumf", gmf_dim=8, mlp_dim=8, mlp_layers=[16, 8])
            >>> net(batch).shape  # logits [B]
            torch.Size([2])
    """

    def __init__(
        self,
        spec: FeatureSpec,
        variant: str = "neumf",
        gmf_dim: int = 32,
        mlp_dim: int = 32,
        mlp_layers: Sequence[int] = (64, 32, 16),
        dropout: float = 0.0,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"model.variant={variant!r} is not one of {VARIANTS}")
        if variant != "gmf" and not mlp_layers:
            raise ValueError("model.mlp_layers must name at least one layer for mlp/neumf")
        self.variant = variant
        head_in = 0
        if variant in ("gmf", "neumf"):
            self.gmf_user = nn.Embedding(spec.num_users, gmf_dim)
            self.gmf_item = nn.Embedding(spec.num_items, gmf_dim)
            head_in += gmf_dim
        if variant in ("mlp", "neumf"):
            self.mlp_user = nn.Embedding(spec.num_users, mlp_dim)
            self.mlp_item = nn.Embedding(spec.num_items, mlp_dim)
            self.mlp = mlp(2 * mlp_dim, mlp_layers, dropout)
            head_in += mlp_layers[-1]
        self.head = nn.Linear(head_in, 1)
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.01)

    def item_embeddings(self) -> torch.Tensor:
        """Item vectors [num_items, G + M] (the towers' item tables side by side)."""
        tables = [getattr(self, n).weight for n in ("gmf_item", "mlp_item") if hasattr(self, n)]
        return torch.cat(tables, dim=1)

    # every variant's logit factors into a user part and an item part: `CatalogueScorer`
    factorised = True

    def item_part(self) -> dict[str, torch.Tensor]:
        """What catalogue scoring needs that no request changes, computed once: the GMF item
        vectors times the head's GMF weights, transposed [G, I]; the item half of the first
        MLP layer, bias included [I, H1], and its user half's weights, transposed [M, H1]."""
        out = {}
        h = self.head.weight[0]
        if self.variant in ("gmf", "neumf"):
            g = self.gmf_item.embedding_dim
            out["gmf"] = (self.gmf_item.weight * h[:g]).T.contiguous()
        if self.variant in ("mlp", "neumf"):
            first, m = self.mlp[0], self.mlp_item.embedding_dim
            out["mlp"] = self.mlp_item.weight @ first.weight[:, m:].T + first.bias
            out["mlp_user"] = first.weight[:, :m].T.contiguous()
        return out

    def score_catalogue(self, users: torch.Tensor, item_part: dict[str, torch.Tensor]):
        """Logits [U, I] of users [U] against every item: the same function as `forward`,
        with the user halves computed once per user instead of once per pair."""
        logits = self.head.bias
        if "gmf" in item_part:
            logits = logits + self.gmf_user(users) @ item_part["gmf"]
        if "mlp" in item_part:
            user_half = self.mlp_user(users) @ item_part["mlp_user"]  # [U, H1]
            hidden = mlp_rest(user_half[:, None, :] + item_part["mlp"][None], self.mlp)  # [U, I, L]
            logits = logits + hidden @ self.head.weight[0, -hidden.shape[-1] :]
        return logits

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns: logits [B]."""
        users, items = batch.ids("user_id"), batch.ids("item_id")
        towers = []
        if self.variant in ("gmf", "neumf"):
            towers.append(self.gmf_user(users) * self.gmf_item(items))
        if self.variant in ("mlp", "neumf"):
            towers.append(self.mlp(torch.cat([self.mlp_user(users), self.mlp_item(items)], 1)))
        return self.head(torch.cat(towers, dim=1)).squeeze(1)
