"""Whole-batch loading: a sampler of index tensors and a dataset that gathers whole batches."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

from recsys.data.batch import Batch
from recsys.data.store import FeatureStore, Interactions
from recsys.errors import InputError


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part, e.g. ``derived_seed(seed, rank, epoch, batch)``:
    generators seeded from it give each (rank, epoch, batch) its own stream, and recreate it
    exactly on resume."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# the share of the accelerator's memory that the training data may take under
# data.device=auto (interactions, features, positive pairs); more stays on the CPU
AUTO_SHARE = 0.25
DEVICES = ("auto", "cpu", "cuda")


def data_device(
    setting: str, accelerator: torch.device, nbytes: int, workers: int = 0, streaming: bool = False
) -> torch.device:
    """Where the training data lives and its batches are built (``data.device``).

    ``cpu``: in memory on the CPU, batches copied to the accelerator. ``cuda``: on the run's
    CUDA device, in the training process (no loader workers, no streaming). ``auto``: the
    CUDA device when the run has one, the data (``nbytes``) takes under `AUTO_SHARE` of its
    memory and neither workers nor streaming are asked for; the CPU otherwise.
    """
    cpu = torch.device("cpu")
    if setting not in DEVICES:
        raise InputError(f"data.device must be one of {DEVICES}, got {setting!r}")
    if setting == "cpu":
        return cpu
    if setting == "cuda":
        if accelerator.type != "cuda":
            raise InputError(
                f"data.device=cuda needs a CUDA accelerator; this run trains on {accelerator}: "
                "use trainer=gpu, or data.device=auto|cpu"
            )
        if workers or streaming:
            raise InputError(
                "data.device=cuda builds batches in the training process from data in memory: "
                f"set data.num_workers=0 (got {workers}) and data.streaming=false (got "
                f"{str(streaming).lower()}), or data.device=cpu"
            )
        return accelerator
    if accelerator.type != "cuda" or workers or streaming:
        return cpu
    memory = torch.cuda.get_device_properties(accelerator).total_memory
    return accelerator if nbytes < AUTO_SHARE * memory else cpu


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
            # drawn on the CPU whatever the rows' device (the same order there and on a GPU),
            # and moved once per epoch
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            rows = rows[torch.randperm(len(rows), generator=g).to(rows.device)]
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
        # the length of _rank_rows() without its shuffle (Lightning asks for it many times)
        n, (rank, world) = len(self.rows), _rank_and_world()
        if world > 1:
            n = n // world if self.even_shards else len(range(rank, n, world))
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


class BatchPairs(NamedTuple):
    """A batch before its features: the (user, item) pairs and labels, the interaction rows
    whose own features it carries (None: pairs without rows, or data without row features),
    and `Batch.num_negatives`."""

    users: torch.Tensor | None
    items: torch.Tensor | None
    labels: torch.Tensor
    rows: torch.Tensor | None = None
    num_negatives: int = 0


class InteractionBatches(Dataset):
    """Map-style dataset whose "index" is a `BatchIndex`: ``ds[index]`` is a whole `Batch`.

    The one builder of training and pointwise batches, on whatever device the interactions
    and features are: `batches` builds several with a single read back from the device (the
    value counts of multi-hot features, the only sizes a batch's data decides), none when the
    data has no multi-hot feature."""

    def __init__(self, interactions: Interactions, features: FeatureStore):
        self.inter = interactions
        self.features = features

    def __len__(self) -> int:
        return len(self.inter)

    def __getitem__(self, index: BatchIndex) -> Batch:
        return self.batches([index])[0]

    def pairs(self, index: BatchIndex) -> BatchPairs:
        """The pairs of one batch: the rows ``index.rows`` as they are."""
        rows, inter = index.rows, self.inter
        users = None if inter.users is None else inter.users[rows]
        items = None if inter.items is None else inter.items[rows]
        return BatchPairs(users, items, inter.labels[rows], rows)

    def batches(self, indices: list[BatchIndex]) -> list[Batch]:
        """The batches of ``indices``, built together: their multi-hot value counts come back
        from the device in one read."""
        plans = [self.pairs(index) for index in indices]
        sizes = [self._list_sizes(p) for p in plans]
        names = list(sizes[0])
        if names:  # one read for every batch
            read = torch.stack([torch.stack(list(s.values())) for s in sizes]).tolist()
            sizes = [dict(zip(names, counts, strict=True)) for counts in read]
        return [self._batch(p, s) for p, s in zip(plans, sizes, strict=True)]

    def _list_sizes(self, p: BatchPairs) -> dict[str, torch.Tensor]:
        sizes = {}
        if p.users is not None:
            sizes |= self.features.list_sizes(p.users, p.items)
        row = self.inter.row
        if row is not None and p.rows is not None:
            sizes |= dict(zip(row.lists, row.list_sizes(p.rows), strict=True))
        return sizes

    def _batch(self, p: BatchPairs, sizes: dict[str, int]) -> Batch:
        row = self.inter.row
        row = None if row is None or p.rows is None else row.take(p.rows, sizes)
        return self.features.make_batch(
            p.users, p.items, p.labels, row, sizes=sizes, num_negatives=p.num_negatives
        )


# batches that `BatchLoader` builds together (in its own process): one read back from the
# device per this many batches when the data has multi-hot features
WINDOW = 16


class BatchLoader(DataLoader):
    """DataLoader over whole batches (``batch_size=None``: no per-sample collate) that
    resumes mid-epoch.

    Without worker processes the batches are built `WINDOW` at a time
    (`InteractionBatches.batches`), in this process and on the data's device; workers build
    one each, the same batches.

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
        for batch in self._batches():
            self._taken += 1
            yield batch

    def _batches(self) -> Iterator[Any]:
        if self.num_workers or not hasattr(self.dataset, "batches"):
            yield from super().__iter__()
            return
        pin = self.pin_memory and torch.cuda.is_available()  # as the DataLoader's own
        indices = iter(self.sampler)
        while window := list(itertools.islice(indices, WINDOW)):
            for batch in self.dataset.batches(window):
                yield batch.pin_memory() if pin and batch.labels.is_cpu else batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.sampler.start = state["batches"]
