"""Any interaction file with a header line: user, item, a label or a rating, side features."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.config import plain
from recsys.data.base import RecDataModule
from recsys.data.preprocess import (
    CleaningReport,
    ProcessedData,
    assemble,
    encode_categorical,
    label_from_rating,
    multi_hot_column,
    standardize,
)
from recsys.data.spec import DenseFeature, SparseFeature
from recsys.errors import InputError, MissingInputError

log = logging.getLogger(__name__)

ROLES = ("user", "item", "label", "rating", "timestamp")
# header names recognised for each role, compared lower-case without "_", "-" or spaces
ALIASES = {
    "user": ("user", "userid", "uid", "customerid", "visitorid"),
    "item": ("item", "itemid", "iid", "movieid", "productid", "bookid", "isbn"),
    "label": ("label", "target", "click", "clicked", "y"),
    "rating": ("rating", "score", "stars", "bookrating"),
    "timestamp": ("timestamp", "time", "ts", "unixtime", "datetime", "date"),
}
FEATURE_KINDS = ("categorical", "multi_hot", "dense")
SHOWN = 5  # offending rows named in an error message


class CSVDataModule(RecDataModule):
    """Interactions from one delimited file with a header line.

    The user and item columns and a ``label`` (0/1) or ``rating`` column (label = rating
    `threshold_op` `rating_threshold`) are found by name: ``userId,itemId,target``,
    ``user_id,item_id,label``, ``user,item,rating,timestamp`` ... need no mapping. Name them
    in ``columns`` when the header differs or is ambiguous. With both a label and a rating
    column the label is the label and the rating is kept. With ``feedback=implicit`` rows
    labelled 0 are removed (and reported): the kept rows are the positives; there a file of
    ``user,item[,timestamp]`` alone also does, each row a positive (rating NaN). A
    ``timestamp`` column (unix seconds or dates) allows the temporal splits; without one it
    is -1.

    Side features are columns of the same file that describe the user (item) of the row:
    ``user_features`` / ``item_features`` = ``{categorical: [col, ...], multi_hot: {col:
    separator}, dense: [col, ...]}``. Each id takes its first non-missing value; ids with
    conflicting values are counted in the report. Feature names are the column names.

    Row features are columns that describe the interaction itself (an impression's context:
    device, hour, the page): ``row_features``, in the same layout, each row its own value
    (codes 0 where missing, dense values standardised, missing ones 0; vocabularies and
    statistics over every row of the file, before repeated (user, item) pairs are removed with
    their rows' features). They need observed
    rows for every pair the model scores, so they take ``feedback=explicit`` and pointwise
    evaluation only (``ranking=null``): a sampled negative item has no row to take them from.

    Bad input raises ``ValueError`` naming the file, the problem and the offending lines (line
    1 is the header): a missing column, an empty file, missing ids, labels or ratings,
    non-numeric values, labels outside {0, 1}. Nothing is dropped silently.

    Args:
        path: the file; the source is named ``csv-<file stem>``.
        sep: field separator.
        encoding: text encoding of the file.
        columns: ``{user, item, label, rating, timestamp}`` -> column name; unset (null)
            roles are detected from the header.
        user_features, item_features: side feature columns, as above.
        row_features: the rows' own feature columns, as above.
        **kwargs: see `RecDataModule` (``data_dir`` defaults to the file's folder).
    """

    def __init__(
        self,
        path: str,
        sep: str = ",",
        encoding: str = "utf-8",
        columns: Mapping[str, str | None] | None = None,
        user_features: Mapping | None = None,
        item_features: Mapping | None = None,
        row_features: Mapping | None = None,
        **kwargs,
    ):
        self.path = Path(path).expanduser()
        kwargs.setdefault("data_dir", str(self.path.parent))
        super().__init__(**kwargs)
        self.sep = sep
        self.encoding = encoding
        self.columns = plain(columns or {})
        unknown = set(self.columns) - set(ROLES)
        if unknown:
            raise InputError(f"data.columns: unknown roles {sorted(unknown)}; use {ROLES}")
        self.features = {
            "user": _check_features(plain(user_features or {}), "user_features"),
            "item": _check_features(plain(item_features or {}), "item_features"),
            "row": _check_features(plain(row_features or {}), "row_features"),
        }
        if self.features["row"] and (self.feedback == "implicit" or self.protocol.ranking):
            setting = (
                "data.feedback=implicit (negatives are sampled items)"
                if self.feedback == "implicit"
                else f"data.ranking={self.protocol.ranking} (candidates are sampled items)"
            )
            raise InputError(
                f"data.row_features={self.features['row']} with {setting}: a row feature is "
                "the value of an observed interaction row, and a sampled negative item has no "
                "row to take it from; use data.feedback=explicit data.ranking=null, or move the "
                "columns to data.user_features / data.item_features"
            )

    @property
    def source(self) -> str:
        return f"csv-{self.path.stem}"

    @property
    def raw_dir(self) -> Path:
        return self.path.parent

    def expected_files(self) -> list[str]:
        return [self.path.name]

    def settings(self) -> dict:
        return {
            **super().settings(),
            "sep": self.sep,
            "encoding": self.encoding,
            "columns": self.columns,
            "user_features": self.features["user"],
            "item_features": self.features["item"],
            "row_features": self.features["row"],
        }

    def download(self) -> None:
        raise MissingInputError(
            f"{self.source}: {self.path} does not exist; set data.path to an interaction file "
            f"(a header line, then one row per interaction)"
        )

    def preprocess(self) -> ProcessedData:
        df = self._read()
        cols = self._resolve_columns(list(df.columns))
        report = CleaningReport(self.source)
        needed = [cols[r] for r in ROLES if cols[r] is not None]
        self._no_missing(df, needed)
        for feats in self.features.values():
            for col in feats.get("dense", []):
                self._numbers(df, col)  # the whole file is checked before any row is removed
        ratings = pd.DataFrame(
            {"user": df[cols["user"]].str.strip(), "item": df[cols["item"]].str.strip()}
        )
        rating = (
            self._numbers(df, cols["rating"]) if cols["rating"] else pd.Series(np.nan, df.index)
        )
        if cols["label"]:
            label = self._numbers(df, cols["label"])
            self._fail_where(~label.isin([0, 1]), df, cols["label"], "must hold labels 0 or 1")
            ratings["label"] = label.to_numpy(np.float32)
        elif cols["rating"]:
            ratings["label"] = label_from_rating(rating, self.rating_threshold, self.threshold_op)
        else:  # feedback=implicit (checked): every row is an interaction, a positive
            ratings["label"] = np.float32(1)
        ratings["rating"] = rating.to_numpy(np.float32)
        ratings["timestamp"] = (
            self._timestamps(df, cols["timestamp"]) if cols["timestamp"] else np.int64(-1)
        )
        if self.feedback == "implicit" and cols["label"]:
            # a 0 label is an observed negative, not an interaction: the base class labels
            # every kept row 1 and samples the negatives
            negative = (ratings["label"] == 0).to_numpy()
            ratings = report.drop(ratings, negative, "rows labelled 0 (feedback=implicit)")
            df = df.loc[~negative]
        vocab, sparse, dense = {}, [], []
        tables = {
            entity: self._side_table(df, ratings[entity], entity, report, vocab, sparse, dense)
            for entity in ("user", "item")
        }
        row = self._row_table(df, vocab, sparse, dense)
        return assemble(
            report, ratings, tables["user"], tables["item"], sparse, dense, vocab, row=row
        )

    # --- reading and checks ------------------------------------------------------------------
    def _read(self) -> pd.DataFrame:
        try:
            df = pd.read_csv(
                self.path,
                sep=self.sep,
                encoding=self.encoding,
                dtype=str,
                keep_default_na=False,
                na_values=[""],
            )
        except pd.errors.EmptyDataError as e:
            raise InputError(f"{self.path}: the file is empty (expected a header line)") from e
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            raise InputError(
                f"{self.path}: cannot be read with sep={self.sep!r}, "
                f"encoding={self.encoding!r}: {e}"
            ) from e
        if df.empty:
            raise InputError(f"{self.path}: no interaction rows, only the header {list(df)}")
        return df

    def _resolve_columns(self, present: list[str]) -> dict[str, str | None]:
        """Column of each role: the configured one (checked), else the one named like it."""
        cols: dict[str, str | None] = {}
        taken = {c for c in self.columns.values() if c}
        for role in ROLES:
            name = self.columns.get(role)
            if name:
                if name not in present:
                    raise InputError(
                        f"{self.path}: data.columns.{role}={name!r} is not a column; the "
                        f"columns are {present}"
                    )
                cols[role] = name
                continue
            found = [c for c in present if _key(c) in ALIASES[role] and c not in taken]
            if len(found) > 1:
                raise InputError(
                    f"{self.path}: columns {found} could each be the {role} column; name one "
                    f"with data.columns.{role}=..."
                )
            cols[role] = found[0] if found else None
            taken.update(found)
        for role in ("user", "item"):
            if cols[role] is None:
                raise InputError(
                    f"{self.path}: no {role} column among {present}: name it "
                    f"{ALIASES[role][0]!r}, {role}_id, ... or set data.columns.{role}=..."
                )
        if cols["label"] is None and cols["rating"] is None and self.feedback == "explicit":
            raise InputError(
                f"{self.path}: no label or rating column among {present}, which "
                f"data.feedback=explicit needs: name a 0/1 column 'label' or 'target', a rating "
                f"column 'rating', or set data.columns.label=... or data.columns.rating=...; "
                f"if every row is an interaction (a positive), set data.feedback=implicit"
            )
        for entity, feats in self.features.items():
            for col in _feature_columns(feats):
                if col not in present:
                    raise InputError(
                        f"{self.path}: {entity}_features column {col!r} is not a column; the "
                        f"columns are {present}"
                    )
        return cols

    def _no_missing(self, df: pd.DataFrame, columns: list[str]) -> None:
        for col in columns:
            missing = df[col].isna() | (df[col].str.strip() == "")
            if missing.any():
                raise InputError(
                    f"{self.path}: column {col!r} has no value at {_line_numbers(missing)}"
                )

    def _numbers(self, df: pd.DataFrame, col: str) -> pd.Series:
        values = pd.to_numeric(df[col].str.strip(), errors="coerce")
        self._fail_where(values.isna() & df[col].notna(), df, col, "must be numeric")
        return values

    def _timestamps(self, df: pd.DataFrame, col: str) -> np.ndarray:
        """Unix seconds from numbers or from dates (any format pandas parses, UTC if naive).

        A column whose values are at least half numbers is read as unix times, else as dates; the
        values that do not fit are named in the error.
        """
        raw = df[col].str.strip()
        numbers = pd.to_numeric(raw, errors="coerce")
        if numbers.notna().mean() >= 0.5:
            self._fail_where(numbers.isna(), df, col, "must hold unix times (numbers)")
            return np.floor(numbers.to_numpy(np.float64)).astype(np.int64)
        dates = pd.to_datetime(raw, errors="coerce", utc=True, format="mixed")
        self._fail_where(dates.isna(), df, col, "must hold dates")
        return ((dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)

    def _fail_where(self, bad: pd.Series, df: pd.DataFrame, col: str, what: str) -> None:
        if bad.any():
            raise InputError(f"{self.path}: column {col!r} {what}, but {_lines(df, bad, col)}")

    # --- side features --------------------------------------------------------------------
    def _side_table(self, df, ids, entity, report, vocab, sparse, dense) -> pd.DataFrame | None:
        """One row per id of ``entity`` with its features (first non-missing value per id)."""
        feats = self.features[entity]
        columns = _feature_columns(feats)
        if not columns:
            return None
        grouped = df[columns].assign(_id=ids.to_numpy()).groupby("_id", sort=False)[columns]
        first, distinct = grouped.first(), grouped.nunique()
        for col in columns:
            report.record(
                f"{entity}s with conflicting {col!r} values",
                int((distinct[col] > 1).sum()),
                len(first),
                "kept the first value:",
            )
        table = pd.DataFrame(index=first.index)
        self._encode(first, feats, entity, table, vocab, sparse, dense)
        return table

    def _row_table(self, df, vocab, sparse, dense) -> pd.DataFrame | None:
        """The row features, row i for row i of ``df`` (positional index)."""
        feats = self.features["row"]
        if not _feature_columns(feats):
            return None
        rows = df[_feature_columns(feats)].reset_index(drop=True)
        table = pd.DataFrame(index=rows.index)
        self._encode(rows, feats, "row", table, vocab, sparse, dense)
        for col in feats.get("categorical", []):  # the layout `read_interactions` reads
            table[col] = table[col].astype(np.int32)
        return table

    def _encode(self, first, feats, entity, table, vocab, sparse, dense) -> None:
        """Encode the feature columns of ``first`` (one row per id, or per interaction row)
        into ``table``, adding their spec entries and vocabularies."""
        columns = _feature_columns(feats)
        reserved = {"user_id", "item_id", "title", *vocab, *(d.name for d in dense)}
        if entity == "row":  # the columns of interactions.parquet
            reserved |= {"user", "item", "label", "rating", "timestamp"}
        for col in columns:
            if col in reserved:
                raise InputError(
                    f"{self.path}: feature name {col!r} is used twice or reserved; features "
                    f"are named by their column, so give each its own column"
                )
            reserved.add(col)
        for col in feats.get("categorical", []):
            table[col], vocab[col] = encode_categorical(first[col].str.strip())
            sparse.append(SparseFeature(col, entity, len(vocab[col])))
        for col, sep in feats.get("multi_hot", {}).items():
            tokens = first[col].fillna("").str.split(sep).reset_index(drop=True).explode()
            tokens = tokens.astype(object).str.strip()
            codes, vocab[col] = encode_categorical(tokens.mask(tokens == ""))
            keep = codes > 0
            lists = multi_hot_column(tokens.index.to_numpy()[keep], codes[keep], len(first))
            table[col] = lists.array
            sparse.append(SparseFeature(col, entity, len(vocab[col]), multi_hot=True))
        for col in feats.get("dense", []):
            table[col] = standardize(first[col])
            dense.append(DenseFeature(col, entity))  # FeatureSpec.of_ids orders by entity


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _check_features(feats: dict, name: str) -> dict:
    unknown = set(feats) - set(FEATURE_KINDS)
    if unknown:
        raise InputError(f"data.{name}: unknown kinds {sorted(unknown)}; use {FEATURE_KINDS}")
    if not isinstance(feats.get("multi_hot") or {}, dict):
        raise InputError(
            f"data.{name}.multi_hot must map column -> separator, e.g. {{genres: '|'}}"
        )
    return {k: v for k, v in feats.items() if v}


def _feature_columns(feats: dict) -> list[str]:
    return [*feats.get("categorical", []), *feats.get("multi_hot", {}), *feats.get("dense", [])]


def _line_numbers(mask: pd.Series) -> str:
    """``lines 3, 7 (2 rows in all)``: file lines of the rows where ``mask`` is true (the
    header is line 1; rows keep their read_csv index, so line = index + 2)."""
    lines = mask.index[mask.to_numpy()].to_numpy() + 2
    shown = ", ".join(map(str, lines[:SHOWN]))
    more = ", ..." if len(lines) > SHOWN else ""
    return f"line{'s' if len(lines) > 1 else ''} {shown}{more} ({len(lines):,} rows in all)"


def _lines(df: pd.DataFrame, mask: pd.Series, col: str) -> str:
    """``line 3 has 'abc', line 9 has 'x' (2 rows in all)``."""
    bad = df.loc[mask.to_numpy(), col]
    shown = ", ".join(f"line {i + 2} has {v!r}" for i, v in bad.iloc[:SHOWN].items())
    more = ", ..." if len(bad) > SHOWN else ""
    return f"{shown}{more} ({len(bad):,} rows in all)"
