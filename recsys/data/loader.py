"""Whole-batch loading: a sampler of index tensors and a dataset that gathers whole batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

from recsys.data.batch import Batch
from recsys.data.negatives import PositiveSet, derived_seed
from recsys.data.store import FeatureStore, Interactions


class BatchIndex(NamedTuple):
    """What a sampler hands the dataset for one batch: its rows, and the seed of the batch's
    random draws (negatives), a function of (seed, rank, epoch, batch number) only."""

    rows: torch.Tensor
    seed: int


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class BatchIndexSampler(Sampler[BatchIndex]):
    """Yields a `BatchIndex` per batch: row indices from a (shuffled) set of rows.

    Under torch.distributed each rank takes a disjoint share of every epoch's permutation
    (the same permutation on every rank: seed + epoch). Training shares are cut to equal
    length so that every rank runs the same number of steps; evaluation shares keep every row
    exactly once. Each batch's draw seed differs by rank, epoch and batch number.

    Lightning calls ``set_epoch`` before each epoch, so each epoch has its own order.
    ``start`` skips the first batches of the next iteration (set when resuming mid-epoch).
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
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_rows(self) -> torch.Tensor:
        rows = self.rows
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            rows = rows[torch.randperm(len(rows), generator=g)]
        rank, world = _rank_and_world()
        if world > 1:
            if self.even_shards:
                rows = rows[: len(rows) // world * world]
            rows = rows[rank::world]
        return rows

    def __iter__(self) -> Iterator[BatchIndex]:
        start, self.start = self.start, 0
        rows = self._rank_rows()
        stop = len(rows) - len(rows) % self.batch_size if self.drop_last else len(rows)
        rank, _ = _rank_and_world()
        for b, batch in enumerate(rows[:stop].split(self.batch_size)):
            if b >= start:
                yield BatchIndex(batch, derived_seed(self.seed, rank, self.epoch, b))

    def __len__(self) -> int:
        n = len(self._rank_rows())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class OrderedBatchIndexSampler(BatchIndexSampler, SequentialSampler):
    """A `BatchIndexSampler` without shuffling, typed as a `SequentialSampler`.

    With ``trainer.overfit_batches`` Lightning replaces every loader's sampler that is not a
    `SequentialSampler` with a per-sample one, which hands single integers to a whole-batch
    dataset; this type tells it the order is already sequential.
    """

    def __init__(self, rows: torch.Tensor, batch_size: int, **kwargs: Any):
        super().__init__(rows, batch_size, shuffle=False, **kwargs)


def batch_sampler(rows: torch.Tensor, batch_size: int, shuffle: bool, **kwargs: Any):
    """The sampler of a whole-batch loader: shuffled per epoch, or in order."""
    if shuffle:
        return BatchIndexSampler(rows, batch_size, shuffle=True, **kwargs)
    return OrderedBatchIndexSampler(rows, batch_size, **kwargs)


class InteractionBatches(Dataset):
    """Map-style dataset whose "index" is a `BatchIndex`: ``ds[index]`` is a whole `Batch`."""

    def __init__(self, interactions: Interactions, features: FeatureStore):
        self.inter = interactions
        self.features = features

    def __len__(self) -> int:
        return len(self.inter)

    def __getitem__(self, index: BatchIndex) -> Batch:
        rows = index.rows
        return self.features.make_batch(
            self.inter.users[rows], self.inter.items[rows], self.inter.labels[rows]
        )


class NegativeSamplingBatches(InteractionBatches):
    """Implicit feedback: ``ds[index]`` is the positives ``index.rows`` plus negatives.

    Layout of the returned `Batch` (B = len(rows), n = num_negatives): rows 0..B-1 are the
    positives (label 1); rows B + b*n .. B + b*n + n-1 are the n negatives of positive b
    (label 0), items not among the user's ``positives`` (the training pairs). Negatives are
    drawn with a generator seeded by ``index.seed``: new ones every epoch, different ones on
    every rank, and the same ones again when a run resumes.
    """

    def __init__(self, interactions, features, positives: PositiveSet, num_negatives: int):
        super().__init__(interactions, features)
        if num_negatives < 1:
            raise ValueError(f"data.num_negatives must be >= 1, got {num_negatives}")
        self.positives = positives
        self.num_negatives = num_negatives

    def __getitem__(self, index: BatchIndex) -> Batch:
        rows = index.rows
        users, items = self.inter.users[rows], self.inter.items[rows]
        g = torch.Generator().manual_seed(index.seed)
        negatives = self.positives.sample(users, self.num_negatives, generator=g)
        n = len(rows)
        return self.features.make_batch(
            torch.cat([users, users.repeat_interleave(self.num_negatives)]),
            torch.cat([items, negatives.flatten()]),
            torch.cat([torch.ones(n), torch.zeros(n * self.num_negatives)]),
        )


class BatchLoader(DataLoader):
    """DataLoader over whole batches (``batch_size=None``: no per-sample collate) that
    resumes mid-epoch.

    ``state_dict`` holds the epoch and how many batches of it were taken; Lightning saves it
    in every checkpoint and hands it back on resume, and ``load_state_dict`` makes the next
    iteration start with the first batch not yet trained on. With the per-batch draw seeds
    of `BatchIndexSampler`, the resumed epoch is the one the interrupted run would have had.
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: BatchIndexSampler,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__(
            dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            # the iterator's worker seed comes from here, not from the global generator, so
            # starting an iteration (a resume, a validation) draws nothing from the latter
            generator=torch.Generator().manual_seed(0),
        )
        self._taken = 0

    def __iter__(self) -> Iterator[Any]:
        self._taken = self.sampler.start
        for batch in super().__iter__():
            self._taken += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.sampler.start = state["batches"]
