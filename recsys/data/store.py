"""A processed dataset loaded as tensors, and the vectorised batch builder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import Batch
from recsys.data.preprocess import INFO, INTERACTIONS_FILE, META_FILE
from recsys.data.spec import FeatureSpec


def ragged_gather(
    offsets: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, total: int | None = None
):
    """Gather variable-length rows of a CSR table without a Python loop.

    Args:
        offsets: [N + 1] row starts into ``values``.
        values: [nnz] concatenated row contents.
        rows: [B] rows to gather.
        total: sum(lengths) when known on the host (`ragged_total`); None reads it from the
            tensors, a host synchronisation on an accelerator.

    Returns:
        (lengths [B], values [sum(lengths)]) of the gathered rows, in order.
    """
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    if total is None:
        total = int(lengths.sum())
    # position of each output element inside its row: arange(total) - (start of its row in out)
    out_starts = torch.cumsum(lengths, 0) - lengths
    shift = torch.repeat_interleave(starts - out_starts, lengths, output_size=total)
    return lengths, values[torch.arange(total, device=values.device) + shift]


def ragged_total(offsets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """int64 scalar on the tables' device: how many values `ragged_gather` of ``rows`` gives."""
    return (offsets[rows + 1] - offsets[rows]).sum()


def _maybe_to(t: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _moved(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; a constant column (expanded, stride 0) stays one element."""
    if t.dim() == 1 and len(t) > 1 and t.stride(0) == 0:
        return t[:1].to(device).expand(len(t))
    return t.to(device)


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


@dataclass
class RowFeatures:
    """The row features of a set of interaction rows, row i for row i: what `make_batch`
    takes beside the ids.

    Attributes:
        codes: name -> int codes [N] of each single-valued row feature.
        lists: name -> (offsets [N + 1], codes [nnz]) of each multi-hot row feature.
        dense: float [N, Dr] (Dr may be 0).
    """

    codes: dict[str, torch.Tensor]
    lists: dict[str, tuple[torch.Tensor, torch.Tensor]]
    dense: torch.Tensor

    def __len__(self) -> int:
        return self.dense.shape[0]

    def take(self, rows: torch.Tensor, sizes: dict[str, int] | None = None) -> RowFeatures:
        """The features of ``rows`` (indices into these), in that order; ``sizes``: the values
        each multi-hot feature gives, when known on the host (`list_sizes`)."""
        lists = {}
        for name, (offsets, values) in self.lists.items():
            total = None if sizes is None else sizes[name]
            lengths, taken = ragged_gather(offsets, values, rows, total)
            lists[name] = (torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]), taken)
        return RowFeatures(
            codes={name: c[rows] for name, c in self.codes.items()},
            lists=lists,
            dense=self.dense[rows],
        )

    def list_sizes(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Scalars on the device: the values of each multi-hot feature that ``rows`` give."""
        return [ragged_total(offsets, rows) for offsets, _ in self.lists.values()]

    def to(self, device: torch.device | str) -> RowFeatures:
        return RowFeatures(
            codes={n: c.to(device) for n, c in self.codes.items()},
            lists={n: (o.to(device), v.to(device)) for n, (o, v) in self.lists.items()},
            dense=self.dense.to(device),
        )

    @classmethod
    def concat(cls, parts: list[RowFeatures]) -> RowFeatures:
        lists = {}
        for name in parts[0].lists:
            offsets = [parts[0].lists[name][0]]
            for p in parts[1:]:
                offsets.append(p.lists[name][0][1:] + offsets[-1][-1])
            values = torch.cat([p.lists[name][1] for p in parts])
            lists[name] = (torch.cat(offsets), values)
        return cls(
            codes={n: torch.cat([p.codes[n] for p in parts]) for n in parts[0].codes},
            lists=lists,
            dense=torch.cat([p.dense for p in parts]),
        )

    @classmethod
    def unknown(cls, spec: FeatureSpec, rows: int) -> RowFeatures:
        """``rows`` rows whose every row feature is unknown: code 0, no codes (multi-hot),
        dense 0. For reading the users' or items' own features from a batch, never to
        score (a model reading row features would score rows that do not exist)."""
        codes, lists = {}, {}
        for f in spec.row_features():
            if f.multi_hot:
                lists[f.name] = (torch.zeros(rows + 1, dtype=torch.long), torch.zeros(0).long())
            else:
                codes[f.name] = torch.zeros(rows, dtype=torch.int32)
        return cls(codes, lists, torch.zeros(rows, len(spec.dense_of("row"))))

    @classmethod
    def from_arrow(cls, spec: FeatureSpec, table: pa.Table) -> RowFeatures:
        """The row feature columns of ``table`` (one row per interaction), by ``spec``."""
        codes, lists = {}, {}
        for f in spec.row_features():
            col = table.column(f.name).combine_chunks()
            if f.multi_hot:
                offsets, values = _list_arrays(col)
                lists[f.name] = (torch.from_numpy(offsets), torch.from_numpy(values))
            else:
                codes[f.name] = torch.from_numpy(col.to_numpy(zero_copy_only=False))
        return cls(codes, lists, _dense_matrix(table, spec.dense_of("row"), table.num_rows))


def _list_arrays(col: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0 [N + 1], values [nnz]) int64 of a list column."""
    offsets = np.array(col.offsets, dtype=np.int64)
    values = np.array(pc.list_flatten(col), dtype=np.int64)
    return offsets - offsets[0], values


def _dense_matrix(table: pa.Table, dense: tuple, rows: int) -> torch.Tensor:
    """float32 [rows, len(dense)] of the named columns of ``table``."""
    if not dense:
        return torch.zeros(rows, 0)
    columns = [np.asarray(table.column(d.name).to_numpy(), np.float32) for d in dense]
    return torch.from_numpy(np.stack(columns, axis=1))


class FeatureStore:
    """User and item side features as tensors; builds a `Batch` for any (user, item) pairs
    and the features of their rows.

    This is the only place batches are made, for training, evaluation, ranking and
    prediction alike: ids index the feature tables (torch gathers), row features come with
    the rows, and the results are concatenated key-major into one `KeyedJaggedTensor`.
    """

    def __init__(self, spec: FeatureSpec, users: pa.Table | None, items: pa.Table | None):
        self.spec = spec
        self.needs_row = bool(spec.row_features() or spec.dense_of("row"))
        tables = {"user": users, "item": items}
        self._tables: dict[str, _Table] = {}
        for f in spec.sparse:
            if f.name in ("user_id", "item_id") or f.entity == "row":
                self._tables[f.name] = _Table(f.entity)
                continue
            col = tables[f.entity].column(f.name).combine_chunks()
            if f.multi_hot:
                offsets, values = _list_arrays(col)
                self._tables[f.name] = _Table(
                    f.entity, offsets=torch.from_numpy(offsets), values=torch.from_numpy(values)
                )
            else:
                codes = torch.from_numpy(np.array(col, dtype=np.int64))
                self._tables[f.name] = _Table(f.entity, codes=codes)
        self._dense = {
            ent: _dense_matrix(tables[ent], spec.dense_of(ent), 0) if spec.dense_of(ent) else None
            for ent in ("user", "item")
        }

    def to(self, device: torch.device | str) -> FeatureStore:
        """A copy whose tables are on ``device``: batches of ids there are built there."""
        out = object.__new__(FeatureStore)
        out.spec, out.needs_row = self.spec, self.needs_row
        out._tables = {
            name: _Table(t.entity, *(_maybe_to(x, device) for x in (t.codes, t.offsets, t.values)))
            for name, t in self._tables.items()
        }
        out._dense = {e: _maybe_to(d, device) for e, d in self._dense.items()}
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the feature tables."""
        tensors = [x for t in self._tables.values() for x in (t.codes, t.offsets, t.values)]
        tensors += list(self._dense.values())
        return sum(x.nbytes for x in tensors if x is not None)

    def list_sizes(self, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scalars on the device: the values each multi-hot user or item feature gives for
        these pairs, what `make_batch` takes as ``sizes`` once read on the host."""
        ids = {"user": users, "item": items}
        return {
            name: ragged_total(t.offsets, ids[t.entity])
            for name, t in self._tables.items()
            if t.offsets is not None
        }

    def make_batch(
        self,
        users: torch.Tensor | None,
        items: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        row: RowFeatures | None = None,
        sizes: dict[str, int] | None = None,
        num_negatives: int = 0,
    ) -> Batch:
        """Batch for the pairs (users[b], items[b]) with the features of their rows; labels
        default to zeros. Built where the ids are (CPU or accelerator); with ``sizes`` known,
        without reading anything back from the device.

        Args:
            users: int64 user codes [B] (None: data without ids).
            items: int64 item codes [B] (None: data without ids).
            labels: float [B] or None.
            row: the rows' features [B] (data with row features only).
            sizes: values of each multi-hot user or item feature for these pairs
                (`list_sizes`, read on the host); None reads them from the tensors.
            num_negatives: `Batch.num_negatives` (the negative-sampling layout).
        """
        if row is None and self.needs_row:
            raise ValueError(
                "this data has row features: a batch needs the features of its rows (pairs "
                "without an observed row, such as sampled negatives, have none)"
            )
        size = len(users) if users is not None else len(row)
        device = users.device if users is not None else row.dense.device
        ids = {"user": users, "item": items}
        lengths, values = [], []
        ones = torch.ones(size, dtype=torch.long, device=device)
        for name, t in self._tables.items():
            if t.entity == "row":
                if name in row.codes:
                    lengths.append(ones)
                    values.append(row.codes[name].long())
                else:
                    offsets, vals = row.lists[name]
                    lengths.append(offsets[1:] - offsets[:-1])
                    values.append(vals)
                continue
            rows = ids[t.entity]
            if t.codes is None and t.offsets is None:
                lengths.append(ones)
                values.append(rows)
            elif t.codes is not None:
                lengths.append(ones)
                values.append(t.codes[rows])
            else:
                total = None if sizes is None else sizes[name]
                ln, vals = ragged_gather(t.offsets, t.values, rows, total)
                lengths.append(ln)
                values.append(vals)
        # every key's length is a shape known on the host: the KJT needs no read of its lengths
        # (`KeyedJaggedTensor.from_lengths_sync` sums them on the host)
        per_key = [len(v) for v in values]
        kjt = KeyedJaggedTensor(
            keys=list(self._tables),
            values=torch.cat(values),
            lengths=torch.cat(lengths),
            stride=size,
            length_per_key=per_key,
            offset_per_key=[0, *accumulate(per_key)],
        )
        dense = [self._dense[e][ids[e]] for e in ("user", "item") if self._dense[e] is not None]
        if row is not None and row.dense.shape[1]:
            dense.append(row.dense)
        dense = torch.cat(dense, dim=1) if dense else torch.zeros(size, 0, device=device)
        if labels is None:
            labels = torch.zeros(size, device=device)
        return Batch(
            dense_features=dense,
            sparse_features=kjt,
            labels=labels.float(),
            num_negatives=num_negatives,
        )


@dataclass
class Interactions:
    """The interaction rows as tensors: codes, 0/1 labels, ratings, timestamps and the rows'
    own features. Data without ids (click logs) has no ``users`` and ``items``; rows without
    ratings or timestamps hold NaN and -1."""

    users: torch.Tensor | None
    items: torch.Tensor | None
    labels: torch.Tensor
    ratings: torch.Tensor
    timestamps: torch.Tensor
    row: RowFeatures | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, rows: torch.Tensor) -> Interactions:
        """The interactions ``rows``, in that order."""
        return Interactions(
            users=None if self.users is None else self.users[rows],
            items=None if self.items is None else self.items[rows],
            labels=self.labels[rows],
            ratings=self.ratings[rows],
            timestamps=self.timestamps[rows],
            row=None if self.row is None else self.row.take(rows),
        )

    def to(self, device: torch.device | str) -> Interactions:
        """These rows on ``device``."""
        return Interactions(
            users=None if self.users is None else self.users.to(device),
            items=None if self.items is None else self.items.to(device),
            labels=self.labels.to(device),
            ratings=_moved(self.ratings, device),
            timestamps=_moved(self.timestamps, device),
            row=None if self.row is None else self.row.to(device),
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors (a constant column counts one element)."""
        tensors = [self.users, self.items, self.labels, self.ratings, self.timestamps]
        if self.row is not None:
            tensors += [*self.row.codes.values(), self.row.dense]
            tensors += [x for pair in self.row.lists.values() for x in pair]
        return sum(
            t.element_size() * (1 if t.dim() == 1 and t.stride(0) == 0 else t.numel())
            for t in tensors
            if t is not None
        )

    def batch(self, features: FeatureStore) -> Batch:
        """These rows as one `Batch`."""
        return features.make_batch(self.users, self.items, self.labels, self.row)


@dataclass
class ProcessedDataset:
    """A processed folder loaded back: metadata, interactions, features, raw ids, and
    ``item_info``: per item code, ``item_id`` (raw), ``title`` and the ``info_`` columns
    without their prefix (e.g. ``genres``, ``author``, ``image_url``), for people."""

    meta: dict
    spec: FeatureSpec
    interactions: Interactions | None
    features: FeatureStore
    user_ids: np.ndarray
    item_ids: np.ndarray
    item_info: pd.DataFrame

    @classmethod
    def load(cls, folder: Path, interactions: bool = True) -> ProcessedDataset:
        """The folder's data; without ``interactions`` (streamed data) all but those."""
        meta = read_meta(folder)
        spec = FeatureSpec.from_dict(meta["spec"])
        path = folder / INTERACTIONS_FILE
        interactions = read_interactions(path, spec) if interactions else None
        if not spec.has_ids:
            return cls(meta, spec, interactions, FeatureStore(spec, None, None), *_NO_IDS)
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


# what a dataset without user and item ids has of them
_NO_IDS = (np.array([], dtype=object), np.array([], dtype=object), pd.DataFrame({"item_id": []}))

# the in-memory dtype of each interaction column, in `Interactions` order; codes are int64
# (the file's are int32) because pair keys user * num_items + item (`PositiveSet`) need it
INTERACTION_DTYPES = {
    "user": np.int64,
    "item": np.int64,
    "label": np.float32,
    "rating": np.float32,
    "timestamp": np.int64,
}
# what a file without the column holds in each row
MISSING = {"rating": float("nan"), "timestamp": -1}


def read_interactions(path: Path, spec: FeatureSpec, batch_rows: int = 1 << 16) -> Interactions:
    """The interactions file as tensors, filled a record batch at a time.

    The arrays are allocated once at their final size and dtype and Arrow decodes one batch
    of ``batch_rows`` rows at a time (one thread), so loading takes the tensors' memory and
    little more; a whole Arrow table beside them, and the copy that converts it, would take
    as much again. Arrow's memory pool gives its cached memory back to the system after.
    Single-valued row features load as int32 codes, dense ones as float32; a file without
    ratings or timestamps (click logs) gets a constant column that takes no memory.
    """
    present = set(pq.read_schema(path).names)
    dtypes = {name: dtype for name, dtype in INTERACTION_DTYPES.items() if name in present}
    codes = [f.name for f in spec.row_features() if not f.multi_hot]
    dtypes.update({name: np.int32 for name in codes})
    dtypes.update({d.name: np.float32 for d in spec.dense_of("row")})
    arrays = read_columns(path, dtypes, batch_rows)
    n = len(arrays["label"])
    columns = {}
    for name, dtype in INTERACTION_DTYPES.items():
        if name in arrays:
            columns[name] = torch.from_numpy(arrays[name])
        elif name in MISSING:
            columns[name] = torch.full((1,), MISSING[name], dtype=_TORCH[dtype]).expand(n)
        else:
            columns[name] = None
    row = None
    if spec.row_features() or spec.dense_of("row"):
        lists = [f.name for f in spec.row_features() if f.multi_hot]
        table = pq.read_table(path, columns=lists) if lists else pa.table({})
        listed = RowFeatures.from_arrow(_only(spec, lists), table) if lists else None
        dense = [arrays[d.name] for d in spec.dense_of("row")]
        row = RowFeatures(
            codes={name: torch.from_numpy(arrays[name]) for name in codes},
            lists=listed.lists if listed else {},
            dense=torch.from_numpy(np.stack(dense, axis=1)) if dense else torch.zeros(n, 0),
        )
    pa.default_memory_pool().release_unused()
    return Interactions(**{_FIELDS[k]: v for k, v in columns.items()}, row=row)


_TORCH = {np.float32: torch.float32, np.int64: torch.int64}
_FIELDS = {
    "user": "users",
    "item": "items",
    "label": "labels",
    "rating": "ratings",
    "timestamp": "timestamps",
}


def _only(spec: FeatureSpec, names: list[str]) -> FeatureSpec:
    """``spec`` with just the sparse row features ``names`` (and no dense ones)."""
    return FeatureSpec(0, 0, sparse=tuple(f for f in spec.sparse if f.name in names))


def read_columns(path: Path, dtypes: dict, batch_rows: int) -> dict[str, np.ndarray]:
    """``{column: array of its dtype}`` for the columns of ``dtypes`` in a Parquet file, each
    allocated once and filled ``batch_rows`` rows at a time."""
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
