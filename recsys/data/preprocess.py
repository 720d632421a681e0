"""Shared preprocessing: encoders, the cleaning report and the on-disk processed format.

A processed dataset is a folder of three Parquet files and a small metadata file:

- ``interactions.parquet``: ``user``, ``item`` (0-based codes, int32), ``label`` (0/1,
  float32), ``rating`` (float32, NaN where the source has none), ``timestamp`` (int64, -1
  where the source has none).
- ``users.parquet`` / ``items.parquet``: row i describes code i: ``raw_id`` (the dataset's own
  id, as a string), optional ``title``, one column per side feature of the `FeatureSpec`
  (int codes, lists of codes for multi-hot features, floats for dense features), and optional
  text columns for people, prefixed ``info_`` (e.g. ``info_genres``, ``info_image_url``):
  shown by predictions, serving and the dashboard, never a feature.
- ``meta.json``: the spec, row counts, vocabularies of the categorical features, the cleaning
  report and the settings the folder was built from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from recsys.data.spec import DenseFeature, FeatureSpec, SparseFeature

log = logging.getLogger(__name__)

# Bump when the processed format or any preprocessing rule changes: old caches are rebuilt.
# 3: user and item codes stored as int32
FORMAT_VERSION = 3
INFO = "info_"  # prefix of the text columns for display (`ProcessedDataset.item_info`)
META_FILE = "meta.json"
INTERACTIONS_FILE = "interactions.parquet"


def cache_key(source: str, settings: dict) -> str:
    """Folder name for a processed dataset: the source plus a hash of its settings."""
    blob = json.dumps({"format": FORMAT_VERSION, **settings}, sort_keys=True, default=str)
    return f"{source}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def file_digest(path: Path) -> str | None:
    """BLAKE2b of a file's bytes (None when it does not exist): the processed-data cache is
    keyed by content, so an edit of a raw file, even one that keeps its size, rebuilds."""
    if not path.is_file():
        return None
    with path.open("rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def cached_digest(path: Path, cache: Path) -> str | None:
    """`file_digest` of ``path``, computed once per (path, size, mtime) and kept in
    ``cache`` (a folder of small JSON files), so a run does not read gigabytes of raw files
    again to learn they have not changed. None when the file does not exist."""
    if not path.is_file():
        return None
    stat = path.stat()
    key = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    record = cache / f"{name}.json"
    if record.exists():
        return json.loads(record.read_text())["digest"]
    digest = file_digest(path)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**key, "digest": digest}))
    os.replace(tmp, record)
    return digest


def encode_ids(raw: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """Sorted dense codes 0..n-1 for raw ids; returns (codes, raw ids in code order)."""
    codes, uniques = pd.factorize(raw, sort=True)
    return codes.astype(np.int64), pd.Index(uniques)


def index_dtype(count: int) -> type:
    """The dtype of ``count`` codes or row indices kept compact: int32 below 2**31, else
    int64 (4 bytes a row, not 8). Stored user and item codes load back as int64."""
    return np.int32 if count < 2**31 else np.int64


def latest_of_pairs(
    users: np.ndarray, items: np.ndarray, num_items: int, timestamps: np.ndarray
) -> np.ndarray:
    """bool [N]: the rows to keep when (user, item) pairs repeat, the latest interaction of
    each pair (by timestamp, then row order): one sort of the pair codes, no per-row loop.

    Args:
        users, items: codes (0..num_users-1, 0..num_items-1) [N].
        num_items: number of item codes.
        timestamps: int [N].
    """
    keys = users.astype(np.int64) * num_items + items
    order = np.lexsort((timestamps, keys))  # by pair, then time, then row (a stable sort)
    keys = keys[order]
    last = np.ones(len(keys), dtype=bool)  # the last row of each pair in that order
    np.not_equal(keys[1:], keys[:-1], out=last[:-1])
    del keys
    keep = np.zeros(len(last), dtype=bool)
    keep[order[last]] = True
    return keep


def encode_categorical(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Codes 1..n for the distinct non-missing values (sorted), 0 for missing.

    Returns (codes, vocabulary) where ``vocabulary[c]`` names code c (``vocabulary[0]`` is
    ``"<unknown>"``).
    """
    codes, uniques = pd.factorize(values, sort=True, use_na_sentinel=True)
    return (codes + 1).astype(np.int64), ["<unknown>", *map(str, uniques)]


def bucketize(values: pd.Series, edges: Sequence[float]) -> tuple[np.ndarray, list[str]]:
    """Bucket codes for a numeric column: 0 for missing, 1..len(edges)+1 by the sorted edges."""
    x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    codes = np.searchsorted(np.asarray(edges, dtype=np.float64), x, side="right") + 1
    codes[np.isnan(x)] = 0
    bounds = ["-inf", *map(str, edges), "inf"]
    vocab = ["<unknown>"] + [f"[{bounds[i]}, {bounds[i + 1]})" for i in range(len(edges) + 1)]
    return codes.astype(np.int64), vocab


def standardize(values: pd.Series) -> np.ndarray:
    """Zero-mean unit-variance float32; missing values become 0 (the mean)."""
    x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    mean, std = np.nanmean(x), np.nanstd(x)
    z = (x - mean) / (std if std > 0 else 1.0)
    return np.nan_to_num(z, nan=0.0).astype(np.float32)


def multi_hot_column(rows: np.ndarray, codes: np.ndarray, num_rows: int) -> pd.Series:
    """Arrow-backed column of code lists from (row position, code) pairs sorted by row."""
    lengths = np.bincount(rows, minlength=num_rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    arr = pa.ListArray.from_arrays(pa.array(offsets), pa.array(codes.astype(np.int64)))
    return pd.Series(pd.arrays.ArrowExtensionArray(arr))


def multi_hot_from_lists(lists: pd.Series) -> tuple[pd.Series, list[str]]:
    """Codes (1..n, sorted vocabulary) for a column of lists of tokens, e.g. genre names.

    Returns an Arrow-backed column of code lists (row i for ``lists.iloc[i]``) and the
    vocabulary. Missing tokens and empty lists give empty code lists.
    """
    flat = lists.reset_index(drop=True).explode()
    codes, vocab = encode_categorical(flat)
    keep = codes > 0
    return multi_hot_column(flat.index.to_numpy()[keep], codes[keep], len(lists)), vocab


def multi_hot_from_flags(flags: np.ndarray, names: list[str]) -> tuple[pd.Series, list[str]]:
    """Code lists from a 0/1 matrix [rows, len(names)]: column j set -> code j + 1."""
    rows, cols = np.nonzero(flags)
    return multi_hot_column(rows, cols + 1, flags.shape[0]), ["<unknown>", *names]


def label_from_rating(rating: pd.Series, threshold: float, op: str) -> np.ndarray:
    """0/1 labels: ``rating > threshold`` (op ``">"``) or ``rating >= threshold`` (op ``">="``)."""
    if op == ">":
        return (rating > threshold).to_numpy(dtype=np.float32)
    if op == ">=":
        return (rating >= threshold).to_numpy(dtype=np.float32)
    raise ValueError(f"data.threshold_op must be '>' or '>=', got {op!r}")


@dataclass
class CleaningReport:
    """Row counts removed by each preprocessing step, printed and kept in the metadata."""

    source: str
    steps: list[dict] = field(default_factory=list)

    def drop(self, df: pd.DataFrame, remove: pd.Series | np.ndarray, step: str) -> pd.DataFrame:
        """Remove the rows where ``remove`` is true and record how many that was."""
        remove = np.asarray(remove, dtype=bool)
        self.record(step, int(remove.sum()), len(df))
        return df.loc[~remove] if remove.any() else df

    def record(self, step: str, count: int, of: int, action: str = "removed") -> None:
        """Record a count of affected rows (``action`` says what happened to them)."""
        self.steps.append({"step": step, "rows": count, "of": of, "action": action})

    def summary(self) -> str:
        lines = [f"Preprocessing report for {self.source}:"]
        for s in self.steps:
            lines.append(f"  {s['step']}: {s['action']} {s['rows']:,} of {s['of']:,} rows")
        return "\n".join(lines)


@dataclass
class ProcessedData:
    """A dataset after preprocessing, before it is written to its cache folder."""

    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    spec: FeatureSpec
    vocab: dict[str, list[str]]
    report: CleaningReport

    def save(self, folder: Path, settings: dict) -> None:
        """Write the folder atomically, so concurrent ranks never read a half-written cache."""
        self._check()
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            self.interactions.to_parquet(tmp / INTERACTIONS_FILE, index=False)
            self.users.to_parquet(tmp / "users.parquet", index=False)
            self.items.to_parquet(tmp / "items.parquet", index=False)
            meta = {
                "format": FORMAT_VERSION,
                "source": self.report.source,
                "settings": settings,
                "num_interactions": len(self.interactions),
                "num_positives": int(self.interactions["label"].sum()),
                "spec": self.spec.to_dict(),
                "vocab": self.vocab,
                "report": self.report.steps,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished the same folder first
                if not (folder / META_FILE).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _check(self) -> None:
        inter, spec = self.interactions, self.spec
        required = ["user", "item", "label", "rating", "timestamp"]
        if list(inter.columns[: len(required)]) != required:
            raise ValueError(f"interactions columns must start with {required}: {list(inter)}")
        if len(self.users) != spec.num_users or len(self.items) != spec.num_items:
            raise ValueError("users/items tables must have one row per user/item code")
        for f in spec.side_features():
            table = self.users if f.entity == "user" else self.items
            if f.name not in table:
                raise ValueError(f"feature {f.name!r} has no column in the {f.entity} table")


def assemble(
    report: CleaningReport,
    ratings: pd.DataFrame,
    users: pd.DataFrame | None,
    items: pd.DataFrame | None,
    sparse: list[SparseFeature],
    dense: list[DenseFeature],
    vocab: dict[str, list[str]],
    row: pd.DataFrame | None = None,
) -> ProcessedData:
    """Build the processed dataset from cleaned interactions and side tables.

    Args:
        report: the cleaning report so far; this adds duplicate and side-table coverage counts.
        ratings: raw ``user``, ``item`` ids with ``label``, ``rating`` and ``timestamp``.
        users, items: side tables indexed by raw id with one column per side feature
            (and ``title`` for items); None when the source has none.
        sparse, dense: the side and row features (not the ids), whose columns are in the
            tables and in ``row``.
        vocab: vocabularies of the categorical side and row features.
        row: the row features (entity ``row``), row i for row i of ``ratings``: int32 codes,
            lists of codes (multi-hot) and float32 columns, stored as columns of
            ``interactions.parquet`` (`recsys.data.store.read_interactions` reads them).

    Users and items are the ids that occur in ``ratings``. Interactions whose user or item
    has no row in its side table are kept with unknown (0) codes and counted in the report.
    """
    n = len(ratings)
    # codes first: removing repeated pairs keeps every user and item, so the codes stay
    user_codes, user_ids = encode_ids(ratings["user"])
    item_codes, item_ids = encode_ids(ratings["item"])
    timestamps = ratings["timestamp"].to_numpy(np.int64)
    keep = latest_of_pairs(user_codes, item_codes, len(item_ids), timestamps)
    report.record("repeated (user, item) pairs, older copies", n - int(keep.sum()), n)
    interactions = pd.DataFrame(
        {
            "user": user_codes.astype(index_dtype(len(user_ids))),
            "item": item_codes.astype(index_dtype(len(item_ids))),
            "label": ratings["label"].to_numpy(np.float32),
            "rating": ratings["rating"].to_numpy(np.float32),
            "timestamp": timestamps,
        },
        copy=False,
    )
    del user_codes, item_codes, timestamps  # the int64 codes (the frame holds int32)
    if row is not None:
        if len(row) != n:
            raise ValueError(f"row features have {len(row)} rows, the interactions {n}")
        row = row.reset_index(drop=True)
        for col in row.columns:
            interactions[col] = row[col].array
    if not keep.all():
        interactions = interactions.loc[keep].reset_index(drop=True)
    user_codes, item_codes = interactions["user"].to_numpy(), interactions["item"].to_numpy()
    tables = {}
    for entity, ids, side, codes in (
        ("user", user_ids, users, user_codes),
        ("item", item_ids, items, item_codes),
    ):
        table = pd.DataFrame({"raw_id": ids.astype(str)})
        if side is not None:
            unknown = side.index.get_indexer(ids) < 0  # (faster than isin on Arrow strings)
            report.record(
                f"interactions whose {entity} has no row in the {entity} file",
                int(unknown[codes].sum()),
                len(interactions),
                "kept with unknown features:",
            )
            for col in side.columns:
                filled = _fill_missing(side[col].reindex(ids), side[col].dtype)
                table[col] = filled.reset_index(drop=True)
        tables[entity] = table
    for f in sparse:
        if f.num_embeddings != len(vocab[f.name]):
            raise ValueError(f"feature {f.name!r}: num_embeddings != vocabulary size")
    spec = FeatureSpec.of_ids(len(user_ids), len(item_ids), side=tuple(sparse), dense=tuple(dense))
    return ProcessedData(interactions, tables["user"], tables["item"], spec, vocab, report)


def year_text(years: pd.Series) -> list[str]:
    """Years as text for display: ``"1995"``, ``""`` where missing."""
    return ["" if pd.isna(y) else str(int(y)) for y in years]


def _fill_missing(col: pd.Series, dtype) -> pd.Series:
    """Side-table values for ids without a row: empty lists, code 0, dense 0, title ''."""
    if isinstance(dtype, pd.ArrowDtype) and pa.types.is_list(dtype.pyarrow_dtype):
        arr = pa.chunked_array(col.array._pa_array).combine_chunks()
        empty = pa.scalar([], type=arr.type)
        filled = pa.compute.if_else(pa.compute.is_null(arr), empty, arr)
        return pd.Series(pd.arrays.ArrowExtensionArray(filled), index=col.index)
    if pd.api.types.is_float_dtype(dtype):
        return col.fillna(0.0).astype(np.float32)
    if pd.api.types.is_integer_dtype(dtype):
        return col.fillna(0).astype(np.int64)
    return col.fillna("").astype(str)
