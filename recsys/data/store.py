"""A processed dataset loaded as tensors, and the vectorised batch builder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import Batch
from recsys.data.preprocess import INFO, META_FILE
from recsys.data.spec import FeatureSpec


def ragged_gather(offsets: torch.Tensor, values: torch.Tensor, rows: torch.Tensor):
    """Gather variable-length rows of a CSR table without a Python loop.

    Args:
        offsets: [N + 1] row starts into ``values``.
        values: [nnz] concatenated row contents.
        rows: [B] rows to gather.

    Returns:
        (lengths [B], values [sum(lengths)]) of the gathered rows, in order.
    """
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    total = int(lengths.sum())
    # position of each output element inside its row: arange(total) - (start of its row in out)
    out_starts = torch.cumsum(lengths, 0) - lengths
    shift = torch.repeat_interleave(starts - out_starts, lengths, output_size=total)
    return lengths, values[torch.arange(total) + shift]


@dataclass
class _Table:
    """One sparse feature's lookup table, by user or item code.

    ``codes`` [N] for single-valued features (None: the code is the id itself);
    ``offsets`` [N + 1] and ``values`` [nnz] for multi-hot features.
    """

    entity: str
    codes: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    values: torch.Tensor | None = None


class FeatureStore:
    """User and item side features as tensors; builds a `Batch` for any (user, item) pairs.

    This is the only place batches are made, for training, evaluation, ranking and
    prediction alike: ids index the feature tables (torch gathers), the results are
    concatenated key-major into one `KeyedJaggedTensor`.
    """

    def __init__(self, spec: FeatureSpec, users: pa.Table, items: pa.Table):
        self.spec = spec
        tables = {"user": users, "item": items}
        self._tables: dict[str, _Table] = {}
        for f in spec.sparse:
            if f.name in ("user_id", "item_id"):
                self._tables[f.name] = _Table(f.entity)
                continue
            col = tables[f.entity].column(f.name).combine_chunks()
            if f.multi_hot:
                offsets = np.array(col.offsets, dtype=np.int64)
                values = np.array(pc.list_flatten(col), dtype=np.int64)
                base = offsets[0]
                self._tables[f.name] = _Table(
                    f.entity,
                    offsets=torch.from_numpy(offsets - base),
                    values=torch.from_numpy(values),
                )
            else:
                codes = torch.from_numpy(np.array(col, dtype=np.int64))
                self._tables[f.name] = _Table(f.entity, codes=codes)
        self._dense = {
            ent: torch.from_numpy(
                np.stack(
                    [
                        np.array(tables[ent].column(d.name), np.float32)
                        for d in spec.dense
                        if d.entity == ent
                    ],
                    axis=1,
                )
            )
            if any(d.entity == ent for d in spec.dense)
            else None
            for ent in ("user", "item")
        }

    def make_batch(
        self, users: torch.Tensor, items: torch.Tensor, labels: torch.Tensor | None = None
    ) -> Batch:
        """Batch for the pairs (users[b], items[b]); labels default to zeros.

        Args:
            users: int64 user codes [B].
            items: int64 item codes [B].
            labels: float [B] or None.
        """
        ids = {"user": users, "item": items}
        lengths, values = [], []
        ones = torch.ones_like(users)
        for t in self._tables.values():
            rows = ids[t.entity]
            if t.codes is None and t.offsets is None:
                lengths.append(ones)
                values.append(rows)
            elif t.codes is not None:
                lengths.append(ones)
                values.append(t.codes[rows])
            else:
                ln, vals = ragged_gather(t.offsets, t.values, rows)
                lengths.append(ln)
                values.append(vals)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(self._tables), values=torch.cat(values), lengths=torch.cat(lengths)
        )
        dense = [self._dense[e][ids[e]] for e in ("user", "item") if self._dense[e] is not None]
        dense = torch.cat(dense, dim=1) if dense else torch.zeros(len(users), 0)
        if labels is None:
            labels = torch.zeros(len(users))
        return Batch(dense_features=dense, sparse_features=kjt, labels=labels.float())


@dataclass
class Interactions:
    """The interaction rows as tensors: codes, 0/1 labels, ratings and timestamps."""

    users: torch.Tensor
    items: torch.Tensor
    labels: torch.Tensor
    ratings: torch.Tensor
    timestamps: torch.Tensor

    def __len__(self) -> int:
        return self.users.shape[0]


@dataclass
class ProcessedDataset:
    """A processed folder loaded back: metadata, interactions, features, raw ids, and
    ``item_info``: per item code, ``item_id`` (raw), ``title`` and the ``info_`` columns
    without their prefix (e.g. ``genres``, ``author``, ``image_url``), for people."""

    meta: dict
    spec: FeatureSpec
    interactions: Interactions
    features: FeatureStore
    user_ids: np.ndarray
    item_ids: np.ndarray
    item_info: pd.DataFrame

    @classmethod
    def load(cls, folder: Path) -> ProcessedDataset:
        meta = read_meta(folder)
        spec = FeatureSpec.from_dict(meta["spec"])
        interactions = read_interactions(folder / "interactions.parquet")
        users = pq.read_table(folder / "users.parquet")
        items = pq.read_table(folder / "items.parquet")
        shown = [c for c in items.column_names if c == "title" or c.startswith(INFO)]
        item_info = items.select(["raw_id", *shown]).to_pandas(ignore_metadata=True)
        item_info.columns = ["item_id", *(c.removeprefix(INFO) for c in shown)]
        return cls(
            meta=meta,
            spec=spec,
            interactions=interactions,
            features=FeatureStore(spec, users, items),
            user_ids=users.column("raw_id").to_numpy(),
            item_ids=items.column("raw_id").to_numpy(),
            item_info=item_info,
        )


# the in-memory dtype of each interaction column, in `Interactions` order; codes are int64
# (the file's are int32) because pair keys user * num_items + item (`PositiveSet`) need it
INTERACTION_DTYPES = {
    "user": np.int64,
    "item": np.int64,
    "label": np.float32,
    "rating": np.float32,
    "timestamp": np.int64,
}


def read_interactions(path: Path, batch_rows: int = 1 << 16) -> Interactions:
    """The interactions file as tensors, filled a record batch at a time.

    The arrays are allocated once at their final size and dtype and Arrow decodes one batch
    of ``batch_rows`` rows at a time (one thread), so loading takes the tensors' memory and
    little more; a whole Arrow table beside them, and the copy that converts it, would take
    as much again. Arrow's memory pool gives its cached memory back to the system after.
    """
    arrays = _read_columns(path, INTERACTION_DTYPES, batch_rows)
    pa.default_memory_pool().release_unused()
    return Interactions(*(torch.from_numpy(arrays[name]) for name in INTERACTION_DTYPES))


def _read_columns(path: Path, dtypes: dict, batch_rows: int) -> dict[str, np.ndarray]:
    file = pq.ParquetFile(path)
    n = file.metadata.num_rows
    out = {name: np.empty(n, dtype) for name, dtype in dtypes.items()}
    start = 0
    for batch in file.iter_batches(batch_size=batch_rows, columns=list(dtypes), use_threads=False):
        stop = start + batch.num_rows
        for name, array in out.items():
            # nulls (missing ratings) come out as NaN
            array[start:stop] = batch.column(name).to_numpy(zero_copy_only=False)
        start = stop
    if start != n:
        raise RuntimeError(f"{path}: read {start:,} of {n:,} rows")
    return out


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META_FILE).read_text())
