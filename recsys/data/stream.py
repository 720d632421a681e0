"""Streaming: the split rows stored as blocks of thousands of rows in litdata shards, read back
a window of blocks at a time and cut into whole batches by indexing.

One stored sample is a block of ``block_rows`` rows (one litdata chunk file each), its columns
numpy arrays: ``label``, ``user`` and ``item`` (data with ids), ``codes`` [n, Fc] (the row's
single-valued sparse features), ``dense`` [n, Dr] and ``<name>.offsets`` / ``<name>.values``
(multi-hot row features). litdata gives each rank a disjoint share of a split's blocks in a
seeded order (the same for the same seed, epoch and world size), downloads them ahead from a
local folder or an object store (``s3://``, ``gs://``, ``local:``) into a cache of bounded
size, and restarts an epoch at any block. On top of it, `StreamBatches` concatenates
``window_blocks`` blocks, permutes their rows (training) and cuts batches; a batch's position
(epoch, block, row) is what the loader saves, so a resumed run reads on from there.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from recsys.data.batch import Batch
from recsys.data.loader import derived_seed
from recsys.data.spec import FeatureSpec
from recsys.data.store import FeatureStore, Interactions, RowFeatures
from recsys.errors import InputError

log = logging.getLogger(__name__)

SHARDS_FILE = "shards.json"
SPLITS = ("train", "val", "test")


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: the one place streaming reads them (litdata's
    own detection is overridden with them, see `StreamBatches._dataset`)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shards_source(url: str) -> str:
    """``url`` as litdata reads it through its cache: ``s3://``, ``gs://`` and ``local:`` as
    they are; a ``file://`` URL or a plain folder as ``local:<absolute folder>`` (litdata reads a
    plain path in place, without the cache, and takes ``file://x`` for a relative path)."""
    if url.startswith("file://"):
        url = url.removeprefix("file://")
    elif "://" in url or url.startswith("local:"):
        return url
    return f"local:{Path(url).expanduser().resolve()}"


# --- blocks -------------------------------------------------------------------------------
def encode_block(inter: Interactions, spec: FeatureSpec) -> dict[str, np.ndarray]:
    """The stored columns of ``inter`` (see the module docstring)."""
    block = {"label": inter.labels.numpy().astype(np.float32)}
    if spec.has_ids:
        block["user"] = inter.users.numpy().astype(np.int32)
        block["item"] = inter.items.numpy().astype(np.int32)
    row = inter.row
    codes = [f.name for f in spec.row_features() if not f.multi_hot]
    if codes:
        block["codes"] = np.stack([row.codes[n].numpy() for n in codes], 1).astype(np.int32)
    if spec.dense_of("row"):
        block["dense"] = row.dense.numpy().astype(np.float32)
    for f in spec.row_features():
        if f.multi_hot:
            offsets, values = row.lists[f.name]
            block[f"{f.name}.offsets"] = offsets.numpy().astype(np.int64)
            block[f"{f.name}.values"] = values.numpy().astype(np.int64)
    return block


def decode_block(block: dict[str, np.ndarray], spec: FeatureSpec) -> Interactions:
    """A stored block back as `Interactions` (ids int64, no ratings or timestamps)."""
    block = {k: np.array(v) for k, v in block.items()}  # litdata's arrays view its read buffer
    labels = torch.from_numpy(block["label"].astype(np.float32, copy=False))
    n = len(labels)
    row = None
    if spec.row_features() or spec.dense_of("row"):
        codes = [f.name for f in spec.row_features() if not f.multi_hot]
        matrix = torch.from_numpy(block["codes"]) if codes else None
        row = RowFeatures(
            codes={name: matrix[:, j] for j, name in enumerate(codes)},
            lists={
                f.name: (
                    torch.from_numpy(block[f"{f.name}.offsets"]),
                    torch.from_numpy(block[f"{f.name}.values"]),
                )
                for f in spec.row_features()
                if f.multi_hot
            },
            dense=torch.from_numpy(block["dense"]) if "dense" in block else torch.zeros(n, 0),
        )
    ids = {
        key: torch.from_numpy(block[key].astype(np.int64)) if spec.has_ids else None
        for key in ("user", "item")
    }
    return Interactions(
        users=ids["user"],
        items=ids["item"],
        labels=labels,
        ratings=torch.full((1,), float("nan")).expand(n),
        timestamps=torch.full((1,), -1, dtype=torch.long).expand(n),
        row=row,
    )


def concat(parts: list[Interactions]) -> Interactions:
    """The rows of ``parts``, one after the other."""
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> torch.Tensor | None:
        tensors = [getattr(p, name) for p in parts]
        return None if tensors[0] is None else torch.cat([t.contiguous() for t in tensors])

    rows = [p.row for p in parts]
    return Interactions(
        users=cat("users"),
        items=cat("items"),
        labels=cat("labels"),
        ratings=cat("ratings"),
        timestamps=cat("timestamps"),
        row=None if rows[0] is None else RowFeatures.concat(rows),
    )


class ShardWriter:
    """Writes rows, given in parts of any size, as blocks of ``block_rows`` rows into a litdata
    dataset in ``folder`` (one chunk file a block); the last block holds the rest."""

    def __init__(self, folder: Path, spec: FeatureSpec, block_rows: int):
        from litdata.streaming.writer import BinaryWriter

        if block_rows < 1:
            raise InputError(f"data.block_rows must be >= 1, got {block_rows}")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.folder, self.spec, self.block_rows = folder, spec, block_rows
        self._writer = BinaryWriter(str(folder), chunk_size=1)
        self._parts: list[Interactions] = []
        self._buffered = 0
        self.rows = 0
        self.blocks = 0

    def add(self, part: Interactions) -> None:
        if len(part) == 0:
            return
        self._parts.append(part)
        self._buffered += len(part)
        while self._buffered >= self.block_rows:
            rows = concat(self._parts)
            self._write(rows.take(torch.arange(self.block_rows)))
            rest = rows.take(torch.arange(self.block_rows, len(rows)))
            self._parts, self._buffered = ([rest] if len(rest) else []), len(rest)

    def _write(self, rows: Interactions) -> None:
        self._writer.add_item(self.blocks, encode_block(rows, self.spec))
        self.blocks += 1
        self.rows += len(rows)

    def close(self) -> dict[str, int]:
        """Write the rest, finish the litdata index; returns ``{rows, blocks}``."""
        if self._parts:
            self._write(concat(self._parts))
        self._parts = []
        if self.blocks == 0:
            raise InputError(f"{self.folder}: no rows to write (an empty split)")
        self._writer.done()
        self._writer.merge()
        return {"rows": self.rows, "blocks": self.blocks}


def write_manifest(folder: Path, block_rows: int, splits: dict[str, dict], about: dict) -> None:
    """``shards.json``: the block size, each split's rows and blocks, and what the shards are
    (``about``: the processed data they come from, the split); read back by `read_manifest`."""
    manifest = {"block_rows": block_rows, "splits": splits, **about}
    (folder / SHARDS_FILE).write_text(json.dumps(manifest, indent=1, default=str))


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / SHARDS_FILE).read_text())


# --- reading --------------------------------------------------------------------------------
@dataclass
class Position:
    """Where a batch starts: the epoch, the batch number, the first block of its window (in
    this rank's order), the window's number and the row within the window."""

    epoch: int
    batch: int
    block: int
    window: int
    offset: int


class StreamBatches(IterableDataset):
    """Whole batches of one split streamed from its shards, each with the `Position` of the
    batch after it.

    Training (``shuffle``): blocks in litdata's seeded order, a window of ``window_blocks``
    blocks at a time with its rows permuted (seeded by seed, rank, epoch and window), cut
    into batches of ``batch_size``. Under torch.distributed each rank reads a disjoint share
    of the blocks; with ``even`` every rank runs `steps` batches (blocks that do not divide
    among the ranks, and rows past the last step, are left out and counted). Evaluation: the
    blocks in order, every row once.

    ``sample`` turns a window's rows (users, items, labels) and a batch's seed into a batch
    (implicit feedback: positives plus sampled negatives); None builds the rows as they are.
    """

    def __init__(
        self,
        url: str,
        cache_dir: Path | None,
        manifest: dict,
        split: str,
        spec: FeatureSpec,
        features: FeatureStore,
        batch_size: int,
        shuffle: bool,
        seed: int,
        window_blocks: int = 8,
        even: bool = False,
        max_cache_size: str = "10GB",
        sample: Callable[[Interactions, int], Batch] | None = None,
    ):
        self.url, self.cache_dir = url, cache_dir
        self.split, self.spec, self.features = split, spec, features
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.block_rows = manifest["block_rows"]
        self.info = manifest["splits"][split]
        # a window holds at least a batch, so a batch spans at most two windows
        self.window_blocks = max(window_blocks, math.ceil(batch_size / self.block_rows))
        self.even, self.max_cache_size, self.sample = even, max_cache_size, sample
        # rows of this rank's share past its last batch in the last epoch (``even`` only)
        self.left_out = 0

    def _dataset(self, epoch: int):
        from litdata import StreamingDataset
        from litdata.utilities.env import _DistributedEnv

        rank, world = _rank_and_world()
        ds = StreamingDataset(
            self.url,
            cache_dir=None if self.cache_dir is None else str(self.cache_dir),
            shuffle=self.shuffle,
            seed=self.seed,
            drop_last=self.even and world > 1,
            max_cache_size=self.max_cache_size,
        )
        env = ds.distributed_env  # litdata's guess (torch.distributed, else WORLD_SIZE ...)
        if (env.world_size, env.global_rank) != (world, rank):
            ds.distributed_env = _DistributedEnv(world, rank, 1)
        ds.set_epoch(epoch + 1)  # litdata counts epochs from 1
        return ds

    def _block_rows(self, block: int) -> int:
        """Rows of stored block ``block`` (all hold ``block_rows`` but the last)."""
        if block < self.info["blocks"] - 1:
            return self.block_rows
        return self.info["rows"] - (self.info["blocks"] - 1) * self.block_rows

    def _unassigned_rows(self, ds, epoch: int) -> int:
        """Rows of the blocks litdata gives no rank in ``epoch`` (with ``drop_last``, the
        blocks past ``blocks // world`` per rank in its shuffled order). Reads litdata's
        shuffler, once its iteration has started (its assignment of blocks to ranks is not
        public); the epoch is given, as litdata moves its own on when an epoch ends."""
        chunks, _ = ds.shuffler.get_chunks_and_intervals_per_workers(
            ds.distributed_env, ds.worker_env.world_size, ds.batch_size, epoch + 1
        )
        assigned = {int(c) for worker in chunks for c in worker}
        return sum(self._block_rows(b) for b in range(self.info["blocks"]) if b not in assigned)

    def steps(self) -> int | None:
        """Batches per rank: with ``even``, the same on every rank, those of the rank whose
        blocks hold the fewest rows; else None (the rank's share: every block once)."""
        _, world = _rank_and_world()
        rows, blocks = self.info["rows"], self.info["blocks"]
        if world == 1:
            return math.ceil(rows / self.batch_size)
        if not self.even:
            return None
        per_rank = blocks // world
        if per_rank == 0:
            raise InputError(
                f"{self.split}: {blocks} blocks of data.block_rows={self.block_rows} rows "
                f"cannot give each of {world} ranks one; lower data.block_rows"
            )
        tail = rows - (blocks - 1) * self.block_rows  # the last block's rows
        fewest = per_rank * self.block_rows - (self.block_rows - tail)
        return math.ceil(fewest / self.batch_size)

    def batches(self, start: Position) -> Iterator[tuple[Batch, Position]]:
        """The batches of ``start.epoch`` from ``start`` on, each with where the next starts."""
        rank, _ = _rank_and_world()
        ds = self._dataset(start.epoch)
        if start.block:
            ds.load_state_dict(ds.state_dict(start.block, num_workers=0, batch_size=1))
        # litdata's dataset is its own iterator, and iter() on it starts the epoch again: the
        # blocks are taken with next() from this one iteration
        blocks = iter(ds)
        steps = self.steps()
        pending: list[_Window] = []  # windows read and not yet wholly batched
        block, window, number = start.block, start.window, start.batch

        def read_window() -> bool:
            nonlocal block, window
            parts = []
            while len(parts) < self.window_blocks:
                stored = next(blocks, None)
                if stored is None:
                    break
                parts.append(decode_block(stored, self.spec))
            if not parts:
                return False
            rows = concat(parts)
            if self.shuffle:
                g = torch.Generator().manual_seed(
                    derived_seed(self.seed, rank, start.epoch, window)
                )
                order = torch.randperm(len(rows), generator=g)
            else:
                order = torch.arange(len(rows))
            pending.append(_Window(window, block, rows, order))
            block += len(parts)
            window += 1
            return True

        if not read_window():
            return
        pending[0].used = start.offset
        while steps is None or number < steps:
            while sum(w.left for w in pending) < self.batch_size and read_window():
                pass
            need = min(self.batch_size, sum(w.left for w in pending))
            if need == 0:
                return
            parts = []
            for w in pending:
                n = min(need, w.left)
                parts.append(w.rows.take(w.order[w.used : w.used + n]))
                w.used += n
                need -= n
                if need == 0:
                    break
            pending = [w for w in pending if w.left]
            number += 1
            first = pending[0] if pending else _Window(window, block, None, None)
            nxt = Position(start.epoch, number, first.block, first.number, first.used)
            yield self._build(concat(parts), number - 1, rank, start.epoch), nxt
        if steps is not None and self.even:
            left = sum(w.left for w in pending)
            while (stored := next(blocks, None)) is not None:
                left += len(stored["label"])
            # the blocks no rank was given are counted once, by rank 0
            unassigned = self._unassigned_rows(ds, start.epoch) if rank == 0 else 0
            self.left_out = left + unassigned
            if self.left_out:
                log.info(
                    "%s: rank %d left out %d rows in epoch %d (%d of its share past the %d "
                    "batches every rank runs, %d in blocks given to no rank)",
                    self.split,
                    rank,
                    self.left_out,
                    start.epoch,
                    left,
                    steps,
                    unassigned,
                )

    def _build(self, rows: Interactions, number: int, rank: int, epoch: int) -> Batch:
        if self.sample is not None:
            return self.sample(rows, derived_seed(self.seed, rank, epoch, number))
        return rows.batch(self.features)

    def __iter__(self) -> Iterator[tuple[Batch, Position]]:
        return self.batches(Position(0, 0, 0, 0, 0))


@dataclass
class _Window:
    """A window of blocks read: its number, its first block in the rank's order, its rows, the
    order they are batched in and how many of them are batched."""

    number: int
    block: int
    rows: Interactions | None
    order: torch.Tensor | None
    used: int = 0

    @property
    def left(self) -> int:
        return len(self.order) - self.used


class StreamLoader(DataLoader):
    """DataLoader over `StreamBatches` (``batch_size=None``, in this process: litdata reads
    ahead in threads of its own) that resumes mid-epoch.

    ``state_dict`` holds the `Position` of the next batch; Lightning saves it in every
    checkpoint and hands it back on resume, and the next iteration starts there: the same
    blocks, the same window order and the same batches as the interrupted run. ``epoch`` gives
    the number of the epoch an iteration runs (the trainer's).
    """

    def __init__(self, dataset: StreamBatches, epoch: Callable[[], int], pin_memory: bool = False):
        super().__init__(dataset, batch_size=None, num_workers=0, pin_memory=pin_memory)
        self.epoch = epoch
        self._next = Position(0, 0, 0, 0, 0)
        self._resume: Position | None = None

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch()
        start, self._resume = self._resume, None
        if start is None or start.epoch != epoch:
            start = Position(epoch, 0, 0, 0, 0)
        self._next = start
        for batch, nxt in self.dataset.batches(start):
            self._next = nxt
            yield batch.pin_memory() if self.pin_memory else batch

    def __len__(self) -> int:
        steps = self.dataset.steps()
        if steps is None:
            raise TypeError("this rank's number of evaluation batches is known when read")
        return steps

    def state_dict(self) -> dict[str, int]:
        return vars(self._next).copy()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = Position(**state)
