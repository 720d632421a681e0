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
        pairs: `Batch` of Q * C rows, query-major (row q * C + c is candidate c of query q).
        users: int64 [Q] user code of each query.
        items: int64 [Q, C] candidate item codes.
        relevant: bool [Q, C] held-out positives among the candidates.
        valid: bool [Q, C] candidates that may be recommended (False: the user already has
            the item, in full ranking).
    """

    pairs: Batch
    users: torch.Tensor
    items: torch.Tensor
    relevant: torch.Tensor
    valid: torch.Tensor

    def __len__(self) -> int:
        return len(self.users)

    def to(self, device, non_blocking: bool = False) -> RankingBatch:
        return RankingBatch(
            self.pairs.to(device, non_blocking=non_blocking),
            *(
                t.to(device=device, non_blocking=non_blocking)
                for t in (self.users, self.items, self.relevant, self.valid)
            ),
        )

    def pin_memory(self) -> RankingBatch:
        return RankingBatch(
            self.pairs.pin_memory(),
            *(t.pin_memory() for t in (self.users, self.items, self.relevant, self.valid)),
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
        relevant = torch.zeros(q, c, dtype=torch.bool)
        relevant[:, 0] = True
        pairs = self.features.make_batch(users.repeat_interleave(c), items.flatten())
        return RankingBatch(pairs, users, items, relevant, torch.ones_like(relevant))


class FullRanking(Dataset):
    """Each user with a held-out positive ranks the whole catalogue.

    Items in ``seen`` (the user's training interactions, and validation ones when testing)
    are marked invalid; every held-out positive of the user is relevant.
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
        flat_users = users.repeat_interleave(c)
        flat_items = torch.arange(c).repeat(q)
        relevant = self.held_out.contains(flat_users, flat_items).view(q, c)
        valid = ~self.seen.contains(flat_users, flat_items).view(q, c)
        pairs = self.features.make_batch(flat_users, flat_items)
        return RankingBatch(pairs, users, flat_items.view(q, c), relevant, valid)
