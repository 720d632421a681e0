"""Ranking evaluation data: each query is one user's candidate items, scored in one batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from recsys.data.batch import Batch
from recsys.data.loader import BatchIndex
from recsys.data.negatives import PositiveSet
from recsys.data.store import FeatureStore

RANKING_MODES = ("sampled", "full")


@dataclass
class RankingBatch:
    """Q ranking queries of C candidates each, with the pairs to score as one `Batch`.

    Attributes:
        pairs: `Batch` of Q * C rows, query-major (row q * C + c is candidate c of query q);
            None in full ranking, where the candidates are the whole catalogue and the model
            scores them with `recsys.scoring.CatalogueScorer` over ``features``.
        users: int64 [Q] user code of each query.
        items: int64 [Q, C] candidate item codes.
        relevant: bool [Q, C] held-out positives among the candidates.
        valid: bool [Q, C] candidates that may be recommended (False: the user already has
            the item, in full ranking).
        features: the batch builder (full ranking), for models that score pairs.
    """

    pairs: Batch | None
    users: torch.Tensor
    items: torch.Tensor
    relevant: torch.Tensor
    valid: torch.Tensor
    features: FeatureStore | None = None

    def __len__(self) -> int:
        return len(self.users)

    def to(self, device, non_blocking: bool = False) -> RankingBatch:
        return RankingBatch(
            None if self.pairs is None else self.pairs.to(device, non_blocking=non_blocking),
            *(
                t.to(device=device, non_blocking=non_blocking)
                for t in (self.users, self.items, self.relevant, self.valid)
            ),
            features=self.features,
        )

    def pin_memory(self) -> RankingBatch:
        return RankingBatch(
            None if self.pairs is None else self.pairs.pin_memory(),
            *(t.pin_memory() for t in (self.users, self.items, self.relevant, self.valid)),
            features=self.features,
        )


class SampledRanking(Dataset):
    """NCF protocol: each held-out positive ranked among its own sampled negatives.

    ``ds[index]`` -> `RankingBatch` of the queries ``index.rows``, with candidates
    [positive, negative_1, ..., negative_n].
    """

    def __init__(
        self,
        features: FeatureStore,
        users: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor,
    ):
        self.features = features
        self.users = users  # [Q]
        self.candidates = torch.cat([positives[:, None], negatives], dim=1)  # [Q, 1 + n]

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index: BatchIndex) -> RankingBatch:
        users, items = self.users[index.rows], self.candidates[index.rows]
        q, c = items.shape
        relevant = torch.zeros(q, c, dtype=torch.bool, device=items.device)
        relevant[:, 0] = True
        pairs = self.features.make_batch(users.repeat_interleave(c), items.flatten())
        return RankingBatch(pairs, users, items, relevant, torch.ones_like(relevant))


class FullRanking(Dataset):
    """Each user with a held-out positive ranks the whole catalogue.

    Items in ``seen`` (the user's training interactions, and validation ones when testing)
    are marked invalid; every held-out positive of the user is relevant. The batches carry no
    pairs: the model scores its users against every item (`recsys.scoring.CatalogueScorer`).
    """

    def __init__(
        self,
        features: FeatureStore,
        users: torch.Tensor,
        held_out: PositiveSet,
        seen: PositiveSet,
        num_items: int,
    ):
        self.features = features
        self.users = users  # [Q] distinct users
        self.held_out, self.seen = held_out, seen
        self.num_items = num_items

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index: BatchIndex) -> RankingBatch:
        users = self.users[index.rows]
        q, c = len(users), self.num_items
        relevant = self.held_out.mask(users)
        valid = ~self.seen.mask(users)
        items = torch.arange(c, device=users.device).expand(q, c)
        return RankingBatch(None, users, items, relevant, valid, features=self.features)
