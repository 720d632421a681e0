"""Vectorised negative sampling for implicit feedback: never one of the user's positives."""

from __future__ import annotations

import hashlib

import torch


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part, e.g. ``derived_seed(seed, rank, epoch, batch)``:
    generators seeded from it give each (rank, epoch, batch) its own stream, and recreate it
    exactly on resume."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


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

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """bool [B]: whether each (users[b], items[b]) is in the set."""
        keys = users * self.num_items + items
        pos = torch.searchsorted(self.keys, keys).clamp_max(len(self.keys) - 1)
        return self.keys[pos] == keys

    def positives_of(self, users: torch.Tensor) -> torch.Tensor:
        """int64 [B]: how many positives each user has."""
        known = users < len(self.count)
        out = torch.zeros_like(users)
        out[known] = self.count[users[known]]
        return out

    def sample(
        self,
        users: torch.Tensor,
        n: int,
        generator: torch.Generator | None = None,
        distinct: bool = False,
    ) -> torch.Tensor:
        """int64 [B, n] items drawn uniformly among each user's non-positives.

        Rejection sampling in rounds over the whole batch (no loop over rows): each round
        redraws only the draws that hit a positive (and, with ``distinct``, that repeat an
        item already drawn for the same row, so each row holds n different items: a uniform
        draw without replacement).

        Raises:
            ValueError: a user has fewer than n non-positives (1 without ``distinct``).
        """
        needed = n if distinct else 1
        left = self.num_items - self.positives_of(users)
        if (left < needed).any():
            b = int(torch.nonzero(left < needed)[0])
            raise ValueError(
                f"user code {int(users[b])} has {int(left[b])} of {self.num_items} items left "
                f"as negatives, fewer than the {needed} to sample: filter such users out, or "
                "sample fewer negatives"
            )
        flat_users = users.repeat_interleave(n)
        items = torch.randint(self.num_items, (len(flat_users),), generator=generator)
        bad = self.contains(flat_users, items)
        if distinct:
            bad |= _repeats(items.view(len(users), n)).flatten()
        while bad.any():
            items[bad] = torch.randint(self.num_items, (int(bad.sum()),), generator=generator)
            redrawn = bad.clone()
            bad[redrawn] = self.contains(flat_users[redrawn], items[redrawn])
            if distinct:
                bad |= _repeats(items.view(len(users), n)).flatten()
        return items.view(len(users), n)


def _repeats(items: torch.Tensor) -> torch.Tensor:
    """bool [B, n]: entries equal to an earlier entry of the same row (the first stays)."""
    sorted_items, order = items.sort(dim=1, stable=True)
    dup = torch.zeros_like(items, dtype=torch.bool)
    dup[:, 1:] = sorted_items[:, 1:] == sorted_items[:, :-1]
    out = torch.zeros_like(dup)
    out.scatter_(1, order, dup)
    return out
