"""Scoring users against the whole catalogue: the one function behind full-ranking evaluation,
predictions, serving and the dashboard.

A model whose score factors into a user part and an item part (`Factorised`:
``net.item_part()`` and ``net.score_catalogue(users, item_part)``; MF, NeuMF in every
variant, EASE, ItemKNN, Hybrid without side features) computes its item side once, then
scores each chunk of users against every item with matrix products. Any other model (DLRM,
Hybrid with side features) scores the (user, item) pairs of each chunk through the one batch
builder; chunks are bounded by ``max_pairs``, so the memory does not grow with the number of
users (``max_pairs=None``: one chunk per call, as the evaluation loop wants, whose batches are
bounded already and whose sharded models need the same number of forwards on every rank).
"""

from __future__ import annotations

import torch
from torch import nn

from recsys.data.negatives import PositiveSet
from recsys.data.spec import FeatureSpec
from recsys.data.store import FeatureStore
from recsys.errors import InputError
from recsys.models.protocols import Factorised

FACTORISED_FLOATS = 1 << 18
# `top_k` masks known items and takes the top-K once per block of users whose scores [U, I] fit
# in this many floats, not once per scoring chunk (a factorised NeuMF scores one user a chunk,
# and a mask per user took a quarter of its time)
BLOCK_FLOATS = 1 << 20


def servable(spec: FeatureSpec) -> bool:
    """Whether (user, item) pairs without an observed row can be scored (`require_pairs`)."""
    return spec.has_ids and not spec.row_features() and not spec.dense_of("row")


def require_pairs(spec: FeatureSpec, task: str) -> None:
    """Raise `InputError` when ``task`` (e.g. ``"predict.py"``) cannot score (user, item)
    pairs of this data that no row was observed for: data without user and item ids (a click
    log), or data with row features (an unobserved pair has no row to take them from).
    Pointwise evaluation of the observed rows (``evaluate.py``: AUROC, log loss) works on
    both."""
    if not spec.has_ids:
        raise InputError(
            f"{task} scores users against items, and this model's data has no user or item "
            "ids (every feature belongs to the row, a click log such as data=criteo): "
            "such a model is not served or recommended from; evaluate.py reports its "
            "pointwise figures (AUROC, log loss) on the test rows"
        )
    rows = [f.name for f in spec.row_features()] + [d.name for d in spec.dense_of("row")]
    if rows:
        raise InputError(
            f"{task} scores (user, item) pairs that have no observed row, and this model reads "
            f"row features {rows} (data.row_features), which only an observed row has: data "
            "with row features is not served or recommended from; evaluate.py reports its "
            "pointwise figures on the test rows"
        )


class CatalogueScorer:
    """Scores [U, num_items] for any users, and their top-K, for a model in eval mode.

    Build it after the weights are final (the item side is computed once, here).

    Example::

            >>> import torch
            >>> from recsys.data import FeatureSpec
            >>> from recsys.data.store import FeatureStore
            >>> from recsys.models import NeuMF
            >>> spec = FeatureSpec.of_ids(num_users=4, num_items=6)
            >>> features = FeatureStore(spec, None, None)
            >>> net = NeuMF(spec, gmf_dim=4, mlp_dim=4, mlp_layers=[8, 4])
            >>> scorer = CatalogueScorer(net, features, num_items=6)
            >>> scorer.factorised, tuple(scorer.scores(torch.tensor([0, 2])).shape)
            (True, (2, 6))
    """

    def __init__(
        self,
        net: nn.Module,
        features: FeatureStore,
        num_items: int,
        max_pairs: int | None = 1 << 18,
    ):
        require_pairs(features.spec, "scoring users against the catalogue")
        self.net, self.features, self.num_items = net.eval(), features, num_items
        self.max_pairs = max_pairs
        self.factorised = isinstance(net, Factorised) and net.factorised
        with torch.inference_mode():
            self.item_part = net.item_part() if self.factorised else None
        self.all_items = torch.arange(num_items)

    @property
    def chunk_users(self) -> int:
        """Users scored at once. Factorised models: as many as keep the largest activation
        [U, I, H] within ``FACTORISED_FLOATS`` (the processor's cache: one user at a time for
        NeuMF on ml-1m's 3.6K items, dozens for GMF, whose largest is the logits [U, I]).
        Others: ``max_pairs`` (user, item) pairs."""
        if self.factorised:
            width = self.item_part["mlp"].shape[1] if "mlp" in self.item_part else 1
            return max(1, FACTORISED_FLOATS // (self.num_items * width))
        if self.max_pairs is None:
            return 1 << 62
        return max(1, self.max_pairs // self.num_items)

    @property
    def block_users(self) -> int:
        """Users whose top-K `top_k` takes at once: whole chunks, with scores [U, num_items]
        within ``BLOCK_FLOATS`` where a chunk is smaller (290 users on ml-1m's 3.6K items)."""
        return max(self.chunk_users, BLOCK_FLOATS // self.num_items)

    @torch.inference_mode()
    def scores(self, users: torch.Tensor) -> torch.Tensor:
        """Logits [U, num_items] of users (int64 codes [U]) against every item."""
        return (
            torch.cat([self._chunk(c) for c in users.split(self.chunk_users)])
            if len(users)
            else torch.empty(0, self.num_items)
        )

    def _chunk(self, users: torch.Tensor) -> torch.Tensor:
        if self.factorised:
            return self.net.score_catalogue(users, self.item_part)
        flat_users = users.repeat_interleave(self.num_items)
        flat_items = self.all_items.repeat(len(users))
        return self.net(self.features.make_batch(flat_users, flat_items)).view(-1, self.num_items)

    @torch.inference_mode()
    def top_k(
        self, users: torch.Tensor, k: int, exclude: PositiveSet | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best items [U, k] and their logits [U, k] per user, best first; items in
        ``exclude`` (e.g. the user's known interactions) are never returned.

        Raises:
            ValueError: k is not in 1..num_items, or a user has fewer than k items left.
        """
        if not 1 <= k <= self.num_items:
            raise ValueError(f"k={k} must be between 1 and the {self.num_items} items")
        tops, logits = [], []
        for block in users.split(self.block_users):
            s = self.scores(block)
            if exclude is not None:
                s.masked_fill_(exclude.mask(block), float("-inf"))
            best, top = s.topk(k, dim=1)
            tops.append(top)
            logits.append(best)
        if not tops:
            return torch.empty(0, k, dtype=torch.long), torch.empty(0, k)
        top, best = torch.cat(tops), torch.cat(logits)
        if torch.isinf(best).any():
            user = int(users[torch.isinf(best).any(dim=1).nonzero()[0, 0]])
            raise ValueError(f"user code {user} has fewer than k={k} items left to recommend")
        return top, best
