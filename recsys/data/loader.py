"""Whole-batch loading: a sampler of index tensors and a dataset that gathers whole batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from recsys.data.batch import Batch
from recsys.data.negatives import PositiveSet
from recsys.data.store import FeatureStore, Interactions


class BatchIndexSampler(Sampler[torch.Tensor]):
    """Yields tensors of row indices, one per batch, from a (shuffled) set of rows.

    Under torch.distributed each rank takes a disjoint share of every epoch's permutation
    (the same permutation on every rank: seed + epoch). Training shares are cut to equal
    length so that every rank runs the same number of steps; evaluation shares keep every row
    exactly once.

    Lightning calls ``set_epoch`` before each epoch, so each epoch has its own order.
    """

    def __init__(
        self,
        rows: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        even_shards: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rows = rows
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.even_shards = even_shards
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_rows(self) -> torch.Tensor:
        rows = self.rows
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            rows = rows[torch.randperm(len(rows), generator=g)]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world, rank = dist.get_world_size(), dist.get_rank()
            if self.even_shards:
                rows = rows[: len(rows) // world * world]
            rows = rows[rank::world]
        return rows

    def __iter__(self) -> Iterator[torch.Tensor]:
        rows = self._rank_rows()
        stop = len(rows) - len(rows) % self.batch_size if self.drop_last else len(rows)
        yield from rows[:stop].split(self.batch_size)

    def __len__(self) -> int:
        n = len(self._rank_rows())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class InteractionBatches(Dataset):
    """Map-style dataset whose "index" is a tensor of rows: ``ds[rows]`` is a whole `Batch`."""

    def __init__(self, interactions: Interactions, features: FeatureStore):
        self.inter = interactions
        self.features = features

    def __len__(self) -> int:
        return len(self.inter)

    def __getitem__(self, rows: torch.Tensor) -> Batch:
        return self.features.make_batch(
            self.inter.users[rows], self.inter.items[rows], self.inter.labels[rows]
        )


class NegativeSamplingBatches(InteractionBatches):
    """Implicit feedback: ``ds[rows]`` is the positives ``rows`` plus fresh negatives.

    Layout of the returned `Batch` (B = len(rows), n = num_negatives): rows 0..B-1 are the
    positives (label 1); rows B + b*n .. B + b*n + n-1 are the n negatives of positive b
    (label 0), items the user never interacted with. Negatives are drawn anew at every call,
    so every epoch sees new ones.
    """

    def __init__(self, interactions, features, positives: PositiveSet, num_negatives: int):
        super().__init__(interactions, features)
        if num_negatives < 1:
            raise ValueError(f"data.num_negatives must be >= 1, got {num_negatives}")
        self.positives = positives
        self.num_negatives = num_negatives

    def __getitem__(self, rows: torch.Tensor) -> Batch:
        users, items = self.inter.users[rows], self.inter.items[rows]
        negatives = self.positives.sample(users, self.num_negatives)
        n = len(rows)
        return self.features.make_batch(
            torch.cat([users, users.repeat_interleave(self.num_negatives)]),
            torch.cat([items, negatives.flatten()]),
            torch.cat([torch.ones(n), torch.zeros(n * self.num_negatives)]),
        )


def batch_loader(
    dataset: Dataset,
    sampler: BatchIndexSampler,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader over whole batches (``batch_size=None``: no per-sample collate)."""
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
