"""Implicit feedback in one place: vectorised negative sampling (never one of the user's
positives), the training batches that pair each positive with its negatives, and the BPR
loss over that pairing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recsys.data.batch import Batch
from recsys.data.loader import BatchIndex, BatchPairs, InteractionBatches
from recsys.data.store import FeatureStore, Interactions, ragged_gather


class PositiveSet:
    """Membership test for (user, item) pairs, by binary search over sorted pair keys.

    Args:
        users, items: int64 [N] the pairs that count as positives (training negatives exclude
            the training pairs only; evaluation candidates exclude every known pair).
        num_items: size of the catalogue.
    """

    def __init__(self, users: torch.Tensor, items: torch.Tensor, num_items: int):
        self.num_items = num_items
        self.keys = torch.unique(users * num_items + items)  # sorted
        self.count = torch.bincount(self.keys // num_items)  # distinct positives per user code
        # row starts of each user's keys, and an empty row for users past the last one
        self._offsets = torch.zeros(len(self.count) + 2, dtype=torch.long)
        self._offsets[1:-1] = torch.cumsum(self.count, 0)
        self._offsets[-1] = len(self.keys)
        self._items = self.keys % num_items
        # user * num_items + (p_j - j) for each user's j-th positive p_j (sorted, as keys are):
        # how many of a user's positives lie below the r-th item the user does not have
        rank = torch.arange(len(self.keys)) - self._offsets[self.keys // num_items]
        self._gaps = self.keys - rank
        self._counts = torch.cat([self.count, self.count.new_zeros(1)])  # 0 past the last user

    def to(self, device: torch.device | str) -> PositiveSet:
        """A copy whose tensors are on ``device``: negatives for users there are drawn there."""
        out = object.__new__(PositiveSet)
        out.num_items = self.num_items
        for name in ("keys", "count", "_offsets", "_items", "_gaps", "_counts"):
            setattr(out, name, getattr(self, name).to(device))
        return out

    @property
    def nbytes(self) -> int:
        names = ("keys", "count", "_offsets", "_items", "_gaps", "_counts")
        return sum(getattr(self, n).nbytes for n in names)

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """bool [B]: whether each (users[b], items[b]) is in the set."""
        keys = users * self.num_items + items
        pos = torch.searchsorted(self.keys, keys).clamp_max(len(self.keys) - 1)
        return self.keys[pos] == keys

    def items_of(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lengths [B], items [sum(lengths)]): each user's items, concatenated in order."""
        known = users.clamp_max(len(self.count))  # past the last user: the empty padding row
        if len(users) == 1:  # one user (a serving request): a slice
            start, end = self._offsets[known[0] : known[0] + 2].tolist()
            return torch.tensor([end - start], device=users.device), self._items[start:end]
        return ragged_gather(self._offsets, self._items, known)

    def mask(self, users: torch.Tensor) -> torch.Tensor:
        """bool [B, num_items]: True where the user has the item."""
        lengths, items = self.items_of(users)
        out = torch.zeros(len(users), self.num_items, dtype=torch.bool, device=users.device)
        rows = torch.arange(len(users), device=users.device)
        out[rows.repeat_interleave(lengths, output_size=len(items)), items] = True
        return out

    def positives_of(self, users: torch.Tensor) -> torch.Tensor:
        """int64 [B]: how many positives each user has."""
        return self._counts[users.clamp_max(len(self.count))]

    def require_negatives(self, users: torch.Tensor, needed: int) -> None:
        """Raise unless each of ``users`` has at least ``needed`` items outside the set.

        Raises:
            ValueError: naming the first user with fewer.
        """
        left = self.num_items - self.positives_of(users)
        if (left < needed).any():
            b = int(torch.nonzero(left < needed)[0])
            raise ValueError(
                f"user code {int(users[b])} has {int(left[b])} of {self.num_items} items left "
                f"as negatives, fewer than the {needed} to sample: filter such users out, or "
                "sample fewer negatives"
            )

    def sample(
        self,
        users: torch.Tensor,
        n: int,
        generator: torch.Generator | None = None,
        distinct: bool = False,
        check: bool = True,
    ) -> torch.Tensor:
        """int64 [B, n] items drawn uniformly among each user's non-positives.

        Each draw picks a rank r uniformly below the user's count of non-positives and maps
        it to the r-th item the user does not have (`nth_negative`): one pass over the whole
        batch, never a positive, however many items the user has. With ``distinct`` each row
        holds n different items (a uniform draw without replacement): the draws that repeat an
        earlier one of the same row are drawn again, in rounds over the batch. Without
        ``distinct`` the draw reads nothing back from the device; ``check=False`` leaves out
        the check below (a read), for callers that made it once for every user
        (`require_negatives`).

        Raises:
            ValueError: a user has fewer than n non-positives (1 without ``distinct``).
        """
        if check:
            self.require_negatives(users, n if distinct else 1)
        left = self.num_items - self.positives_of(users)
        flat_users, flat_left = users.repeat_interleave(n), left.repeat_interleave(n)

        def draw(rows: torch.Tensor | slice) -> torch.Tensor:
            u, k = flat_users[rows], flat_left[rows]
            uniform = torch.rand(len(u), generator=generator, dtype=torch.float64, device=u.device)
            return self.nth_negative(u, (uniform * k).long())

        items = draw(slice(None))
        if distinct:
            bad = _repeats(items.view(len(users), n)).flatten()
            while bad.any():
                items[bad] = draw(bad)
                bad = _repeats(items.view(len(users), n)).flatten()
        return items.view(len(users), n)

    def nth_negative(self, users: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """int64 [B]: the r[b]-th item (from 0, in item order) that user users[b] does not
        have; r[b] must lie below the user's count of non-positives.

        The user's positives p_0 < p_1 < ... below that item are those with p_j - j <= r, so
        the item is r plus their count, found by binary search over the (p_j - j) of all users.
        """
        known = users.clamp_max(len(self.count))  # past the last user: no positives
        below = torch.searchsorted(self._gaps, users * self.num_items + r, right=True)
        return r + below - self._offsets[known]


def _repeats(items: torch.Tensor) -> torch.Tensor:
    """bool [B, n]: entries equal to an earlier entry of the same row (the first stays)."""
    sorted_items, order = items.sort(dim=1, stable=True)
    dup = torch.zeros_like(items, dtype=torch.bool)
    dup[:, 1:] = sorted_items[:, 1:] == sorted_items[:, :-1]
    out = torch.zeros_like(dup)
    out.scatter_(1, order, dup)
    return out


class NegativeSamplingBatches(InteractionBatches):
    """Implicit feedback: ``ds[index]`` is the positives ``index.rows`` plus negatives.

    Layout of the returned `Batch` (B = len(rows), n = num_negatives): rows 0..B-1 are the
    positives (label 1); rows B + b*n .. B + b*n + n-1 are the n negatives of positive b
    (label 0), items not among the user's ``positives`` (the training pairs). Negatives are
    drawn with a generator seeded by ``index.seed`` on the data's device: new ones every
    epoch, different ones on every rank, and the same ones again when a run resumes.
    """

    def __init__(
        self,
        interactions: Interactions,
        features: FeatureStore,
        positives: PositiveSet,
        num_negatives: int,
    ):
        super().__init__(interactions, features)
        if num_negatives < 1:
            raise ValueError(f"data.num_negatives must be >= 1, got {num_negatives}")
        self.positives = positives
        self.num_negatives = num_negatives
        # once for every user, so that no batch reads it back (`PositiveSet.sample`)
        positives.require_negatives(
            torch.arange(len(positives.count) + 1, device=positives.count.device), 1
        )

    def pairs(self, index: BatchIndex) -> BatchPairs:
        rows = index.rows
        return BatchPairs(
            *negative_pairs(
                self.positives,
                self.num_negatives,
                self.inter.users[rows],
                self.inter.items[rows],
                index.seed,
                check=False,
            ),
            num_negatives=self.num_negatives,
        )


def negative_pairs(
    positives: PositiveSet,
    num_negatives: int,
    users: torch.Tensor,
    items: torch.Tensor,
    seed: int,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(users, items, labels) of the positive pairs (users[b], items[b]) followed by
    ``num_negatives`` negatives each (layout: `NegativeSamplingBatches`), drawn with a
    generator on the ids' device seeded by ``seed`` among the items not in ``positives``."""
    generator = torch.Generator(device=users.device).manual_seed(seed)
    negatives = positives.sample(users, num_negatives, generator=generator, check=check)
    n = len(users)
    labels = torch.cat(
        [torch.ones(n, device=users.device), torch.zeros(n * num_negatives, device=users.device)]
    )
    return (
        torch.cat([users, users.repeat_interleave(num_negatives)]),
        torch.cat([items, negatives.flatten()]),
        labels,
    )


def negative_batch(
    features: FeatureStore,
    positives: PositiveSet,
    num_negatives: int,
    rows: Interactions,
    seed: int,
) -> Batch:
    """The positives ``rows`` followed by ``num_negatives`` negatives each as one `Batch`
    (`negative_pairs`)."""
    pairs = negative_pairs(positives, num_negatives, rows.users, rows.items, seed)
    return features.make_batch(*pairs, num_negatives=num_negatives)


def bpr_loss(logits: torch.Tensor, num_negatives: int) -> torch.Tensor:
    """BPR over a negative-sampling batch: P positives first, then n negatives per positive.
    The layout comes from the batch (`Batch.num_negatives`), not from its labels: nothing is
    read back from the device.

    Args:
        logits: [P * (1 + n)] scores in the layout of `NegativeSamplingBatches`.
        num_negatives: n, the batch's `Batch.num_negatives` (0: not that layout).
    """
    n_neg = num_negatives
    p = len(logits) // (1 + n_neg)
    if p == 0 or n_neg < 1 or len(logits) != p * (1 + n_neg):
        raise ValueError(
            "model.loss=bpr needs batches of positives followed by their sampled negatives: "
            "set data.feedback=implicit"
        )
    pos = logits[:p].unsqueeze(1)  # [P, 1]
    neg = logits[p:].view(p, n_neg)  # [P, n]
    return -F.logsigmoid(pos - neg).mean()
