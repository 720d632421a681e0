"""Vectorised negative sampling for implicit feedback: never one of the user's positives."""

from __future__ import annotations

import torch


class PositiveSet:
    """Membership test for (user, item) pairs, by binary search over sorted pair keys.

    Args:
        users, items: int64 [N] observed interactions (all splits: a held-out positive is
            still a positive, never a negative).
        num_items: size of the catalogue.
    """

    def __init__(self, users: torch.Tensor, items: torch.Tensor, num_items: int):
        self.num_items = num_items
        self.keys = torch.unique(users * num_items + items)  # sorted
        self.count = torch.bincount(users)  # interactions per user code

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """bool [B]: whether each (users[b], items[b]) is an observed interaction."""
        keys = users * self.num_items + items
        pos = torch.searchsorted(self.keys, keys).clamp_max(len(self.keys) - 1)
        return self.keys[pos] == keys

    def sample(
        self, users: torch.Tensor, n: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """int64 [B, n] items drawn uniformly among each user's non-positives.

        Rejection sampling in rounds over the whole batch (no loop over rows): each round
        redraws only the pairs that hit a positive.

        Raises:
            ValueError: a user has interacted with every item, so has no negative.
        """
        full = self.count[users] >= self.num_items
        if full.any():
            raise ValueError(
                f"user code {int(users[full][0])} has interacted with all {self.num_items} "
                "items: no negative can be sampled; filter such users out"
            )
        flat_users = users.repeat_interleave(n)
        items = torch.randint(self.num_items, (len(flat_users),), generator=generator)
        bad = self.contains(flat_users, items)
        while bad.any():
            items[bad] = torch.randint(self.num_items, (int(bad.sum()),), generator=generator)
            bad[bad.clone()] = self.contains(flat_users[bad], items[bad])
        return items.view(len(users), n)
