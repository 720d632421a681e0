"""Book-Crossing (Ziegler et al. 2005): the Kaggle CSV layout and the original BX-* dump."""

from __future__ import annotations

import datetime
import html
import io
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data.base import RecDataModule
from recsys.data.preprocess import (
    INFO,
    CleaningReport,
    ProcessedData,
    assemble,
    bucketize,
    encode_categorical,
    label_from_rating,
    standardize,
    year_text,
)
from recsys.data.spec import DenseFeature, SparseFeature
from recsys.errors import InputError, MissingInputError

log = logging.getLogger(__name__)

# file names by role; the layout is told apart by which of them are in the folder
LAYOUTS = {
    "kaggle": {"books": "Books.csv", "users": "Users.csv", "ratings": "Ratings.csv"},
    "original": {
        "books": "BX-Books.csv",
        "users": "BX-Users.csv",
        "ratings": "BX-Book-Ratings.csv",
    },
}
# columns by position (the two layouts name a few of them differently)
COLUMNS = {
    "books": ["isbn", "title", "author", "year", "publisher", "url_s", "url_m", "url_l"],
    "users": ["user", "location", "age"],
    "ratings": ["user", "isbn", "rating"],
}
# the first column's name in a header line, in either layout
HEADER_FIRST = {"books": "ISBN", "users": "User-ID", "ratings": "User-ID"}
AGE_RANGE = (5, 100)
AGE_EDGES = [18, 25, 35, 45, 55, 65]
YEAR_EDGES = [1950, 1970, 1980, 1990, 1995, 2000, 2005]
# the original dump escapes quotes MySQL-style: \" inside a field, or a stray backslash
# right before the closing quote (a title ending in "\")
_ESCAPED_QUOTE = re.compile(r'\\"(?![;\n]|$)')
_BACKSLASH_BEFORE_CLOSE = re.compile(r'\\"(?=[;\n]|$)')
_SKIPPED = re.compile(r"Skipping line (\d+)")


class BookCrossingDataModule(RecDataModule):
    """Book-Crossing ratings (user, ISBN, 0-10) with user and book side features.

    Rating 0 is an implicit interaction, 1-10 explicit ratings. With ``feedback=explicit``
    (a `RecDataModule` option) the zeros are removed and the label is ``rating >= 6``
    (``rating_threshold``, ``threshold_op``); with ``feedback=implicit`` every interaction,
    zeros included, is a positive (label 1, the rating is kept) and the base class samples
    the negatives. The data has no timestamps (-1): use a random split.

    Sparse features: ``user_id``, ``item_id``, ``author``, ``publisher``, ``year``
    (publication year, bucketed), ``age`` (bucketed), ``country`` (last part of the
    location). Dense: ``age_value`` and ``pub_year``, standardised. Ages outside 5-100 and
    years that are 0 or later than ``max_year`` are missing. Author, publisher and country
    values seen on fewer than ``min_count`` of the rated books (users) become unknown.
    Ratings whose ISBN (user) has no row in the books (users) file are kept with unknown
    features. Every change to the data is counted in the cleaning report.

    Both layouts are read, told apart by the file names in ``<data_dir>/book-crossing``:
    Kaggle (``Books.csv``, ``Users.csv``, ``Ratings.csv``: comma-separated, UTF-8) and the
    original dump (``BX-Books.csv``, ``BX-Users.csv``, ``BX-Book-Ratings.csv``:
    ``;``-separated, quoted, Latin-1, with or without a header line). Rows that cannot be
    parsed (a wrong number of fields) are skipped and reported.

    Args:
        layout: ``auto`` (by the files present), ``kaggle`` or ``original``.
        min_count: author/publisher/country values on fewer rows become unknown (1: off).
        min_user_interactions, min_item_interactions: k-core filter, applied until every
            user and item has at least this many interactions (0: off).
        max_year: latest valid publication year (default: the current year).
        **kwargs: see `RecDataModule`.
    """

    def __init__(
        self,
        layout: str = "auto",
        min_count: int = 2,
        min_user_interactions: int = 0,
        min_item_interactions: int = 0,
        max_year: int | None = None,
        **kwargs,
    ):
        if layout not in ("auto", *LAYOUTS):
            raise InputError(f"data.layout={layout!r} is not one of {['auto', *LAYOUTS]}")
        super().__init__(**kwargs)
        self.layout = layout
        self.min_count = min_count
        self.min_user_interactions = min_user_interactions
        self.min_item_interactions = min_item_interactions
        self.max_year = max_year or datetime.date.today().year

    @property
    def source(self) -> str:
        return "book-crossing"

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / self.source

    @property
    def resolved_layout(self) -> str:
        """``kaggle`` or ``original``: the configured one, else the one whose files exist."""
        if self.layout != "auto":
            return self.layout
        present = {
            name: sum((self.raw_dir / f).is_file() for f in files.values())
            for name, files in LAYOUTS.items()
        }
        if present["original"] > present["kaggle"]:
            return "original"
        return "kaggle"

    def expected_files(self) -> list[str]:
        return list(LAYOUTS[self.resolved_layout].values())

    def settings(self) -> dict:
        return {
            **super().settings(),
            "layout": self.resolved_layout,
            "min_count": self.min_count,
            "min_user_interactions": self.min_user_interactions,
            "min_item_interactions": self.min_item_interactions,
            "max_year": self.max_year,
        }

    def download(self) -> None:
        layouts = "; or ".join(
            f"the {name} layout: {', '.join(files.values())}" for name, files in LAYOUTS.items()
        )
        raise MissingInputError(
            f"{self.source}: raw files not found in {self.raw_dir} (missing: "
            f"{', '.join(self.missing_files())}). Book-Crossing has no official download "
            f"URL: put {layouts} there, or point paths.data_dir (env RECSYS_DATA_DIR) at the "
            f"folder that holds {self.raw_dir.name}/."
        )

    def preprocess(self) -> ProcessedData:
        report = CleaningReport(self.source)
        layout = self.resolved_layout
        raw = {role: self._read(role, layout, report) for role in COLUMNS}
        ratings = self._ratings(raw["ratings"], report)
        books = self._clean_books(raw["books"], report)
        users = self._clean_users(raw["users"], report)
        if self.min_user_interactions > 0 or self.min_item_interactions > 0:
            ratings = k_core(
                ratings, self.min_user_interactions, self.min_item_interactions, report
            )
        if ratings.empty:
            raise InputError(
                f"{self.source}: no interactions left after cleaning; relax data.feedback or "
                f"the k-core filter (data.min_user_interactions, data.min_item_interactions)."
                f"\n{report.summary()}"
            )
        # features are encoded over the users and books that are rated: no dead vocabulary
        books = books.loc[_rated(books.index, ratings["item"])]
        users = users.loc[_rated(users.index, ratings["user"])]
        vocab, sparse, dense = {}, [], []
        items = self._book_features(books, report, vocab, sparse, dense)
        users = self._user_features(users, report, vocab, sparse, dense)
        return assemble(report, ratings, users, items, sparse, dense, vocab)

    # --- reading --------------------------------------------------------------------------
    def _read(self, role: str, layout: str, report: CleaningReport) -> pd.DataFrame:
        """One raw file as strings, columns by position; unparseable rows are reported."""
        path = self.raw_dir / LAYOUTS[layout][role]
        if layout == "kaggle":
            sep, encoding, source = ",", "utf-8", path
        else:
            sep, encoding = ";", "latin-1"
            text = path.read_text(encoding=encoding)  # universal newlines: CRLF -> LF
            text = _BACKSLASH_BEFORE_CLOSE.sub('"', _ESCAPED_QUOTE.sub('""', text))
            source = io.StringIO(text)
        names = COLUMNS[role]
        header = _has_header(path, sep, encoding, HEADER_FIRST[role])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            df = pd.read_csv(
                source,
                sep=sep,
                encoding=encoding,
                header=None,
                skiprows=1 if header else 0,
                names=names,
                dtype=str,
                keep_default_na=False,
                na_values=[""],
                on_bad_lines="warn",
            )
        bad = [int(m) for w in caught for m in _SKIPPED.findall(str(w.message))]
        if bad:
            log.warning(
                "%s: skipped %d rows that could not be parsed, at lines %s%s",
                path,
                len(bad),
                ", ".join(map(str, bad[:10])),
                " ..." if len(bad) > 10 else "",
            )
        report.record(
            f"{path.name}: rows that could not be parsed (wrong number of fields)",
            len(bad),
            len(df) + len(bad),
        )
        return df

    # --- cleaning ------------------------------------------------------------------------
    def _ratings(self, df: pd.DataFrame, report: CleaningReport) -> pd.DataFrame:
        ratings = pd.DataFrame(
            {
                "user": pd.to_numeric(df["user"], errors="coerce"),
                "item": _normalise_isbn(df["isbn"]),
                "rating": pd.to_numeric(df["rating"], errors="coerce"),
            }
        )
        ratings = report.drop(
            ratings,
            ratings.isna().any(axis=1).to_numpy(),
            "ratings with a missing or non-numeric user, ISBN or rating",
        )
        r = ratings["rating"]
        ratings = report.drop(ratings, ~(r.between(0, 10) & (r % 1 == 0)), "ratings outside 0-10")
        ratings = ratings.astype({"user": np.int64, "rating": np.float32})
        if self.feedback == "explicit":
            ratings = report.drop(
                ratings,
                ratings["rating"] == 0,
                "implicit interactions (rating 0; feedback=explicit)",
            )
            ratings["label"] = label_from_rating(
                ratings["rating"], self.rating_threshold, self.threshold_op
            )
        else:
            ratings["label"] = np.float32(1.0)
        ratings["timestamp"] = np.int64(-1)  # Book-Crossing has no times
        return ratings.reset_index(drop=True)[["user", "item", "label", "rating", "timestamp"]]

    def _clean_books(self, df: pd.DataFrame, report: CleaningReport) -> pd.DataFrame:
        df = _realign_shifted(df.assign(isbn=_normalise_isbn(df["isbn"])), report)
        df = report.drop(df, df["isbn"].isna().to_numpy(), "books without an ISBN")
        df = report.drop(
            df, df["isbn"].duplicated().to_numpy(), "books whose ISBN is repeated, later copies"
        )
        year = pd.to_numeric(df["year"], errors="coerce")
        invalid = ~year.between(1, self.max_year)
        report.record(
            f"publication years that are not a year in 1-{self.max_year}",
            int(invalid.sum()),
            len(df),
            "set to missing",
        )
        return pd.DataFrame(
            {
                "title": _unescape(df["title"]).fillna(""),
                "author": _unescape(df["author"]).str.strip(),
                "publisher": _unescape(df["publisher"]).str.strip(),
                "year": year.where(~invalid),
                "image_url": df["url_m"].fillna("").str.strip(),
            }
        ).set_index(df["isbn"].rename("item"))

    def _clean_users(self, df: pd.DataFrame, report: CleaningReport) -> pd.DataFrame:
        user = pd.to_numeric(df["user"], errors="coerce")
        df = report.drop(df.assign(user=user), user.isna().to_numpy(), "users without an id")
        df = report.drop(
            df, df["user"].duplicated().to_numpy(), "users whose id is repeated, later copies"
        )
        age = pd.to_numeric(df["age"], errors="coerce")
        given = df["age"].notna() & (df["age"].str.strip().str.upper() != "NULL")
        invalid = given & ~age.between(*AGE_RANGE)
        report.record(
            f"user ages outside {AGE_RANGE[0]}-{AGE_RANGE[1]} (or not a number)",
            int(invalid.sum()),
            len(df),
            "set to missing",
        )
        # the last comma-separated part; a regex replace runs in Arrow, rsplit in Python
        country = df["location"].str.replace(r"^.*,", "", regex=True)
        country = _unescape(country).str.strip().str.lower()
        country = country.mask((country == "") | (country == "n/a"))
        return pd.DataFrame({"age": age.where(~invalid), "country": country}).set_index(
            df["user"].astype(np.int64).rename("user")
        )

    # --- features ---------------------------------------------------------------------------
    def _book_features(self, books, report, vocab, sparse, dense) -> pd.DataFrame:
        out = pd.DataFrame({"title": books["title"].astype(str)}, index=books.index)
        out[INFO + "author"] = books["author"].fillna("")
        out[INFO + "publisher"] = books["publisher"].fillna("")
        out[INFO + "year"] = year_text(books["year"])
        out[INFO + "image_url"] = books["image_url"]
        for name in ("author", "publisher"):
            values = _cap_rare(books[name], self.min_count, f"{name}s", "books", report)
            out[name], vocab[name] = encode_categorical(values)
            sparse.append(SparseFeature(name, "item", len(vocab[name])))
        out["year"], vocab["year"] = bucketize(books["year"], YEAR_EDGES)
        sparse.append(SparseFeature("year", "item", len(vocab["year"])))
        out["pub_year"] = standardize(books["year"])
        dense.append(DenseFeature("pub_year", "item"))
        return out

    def _user_features(self, users, report, vocab, sparse, dense) -> pd.DataFrame:
        out = pd.DataFrame(index=users.index)
        out["age"], vocab["age"] = bucketize(users["age"], AGE_EDGES)
        out["age_value"] = standardize(users["age"])
        country = _cap_rare(users["country"], self.min_count, "countries", "users", report)
        out["country"], vocab["country"] = encode_categorical(country)
        sparse += [
            SparseFeature("age", "user", len(vocab["age"])),
            SparseFeature("country", "user", len(vocab["country"])),
        ]
        dense.insert(0, DenseFeature("age_value", "user"))  # the batch puts user columns first
        return out


def k_core(
    ratings: pd.DataFrame, min_user: int, min_item: int, report: CleaningReport
) -> pd.DataFrame:
    """Drop interactions of users (items) with fewer than ``min_user`` (``min_item``)
    distinct interacted items (users), repeatedly, until every remaining one has enough."""
    users, _ = pd.factorize(ratings["user"])
    items, _ = pd.factorize(ratings["item"])
    distinct = ~ratings.duplicated(["user", "item"]).to_numpy()  # repeats count once
    keep = np.ones(len(ratings), dtype=bool)
    rounds = 0
    while True:
        counted = keep & distinct
        user_deg = np.bincount(users[counted], minlength=users.max() + 1)
        item_deg = np.bincount(items[counted], minlength=items.max() + 1)
        drop = keep & ((user_deg[users] < min_user) | (item_deg[items] < min_item))
        if not drop.any():
            break
        keep &= ~drop
        rounds += 1
    gone_users = len(np.unique(users)) - len(np.unique(users[keep]))
    gone_items = len(np.unique(items)) - len(np.unique(items[keep]))
    return report.drop(
        ratings,
        ~keep,
        f"k-core filter (users >= {min_user}, items >= {min_item} interactions; "
        f"{rounds} rounds, {gone_users:,} users and {gone_items:,} items dropped)",
    )


def _realign_shifted(df: pd.DataFrame, report: CleaningReport) -> pd.DataFrame:
    """Repair the Kaggle rows where ``Title\\";Author"`` shares one field (the original's
    escaped quote): the author sits in the title, the year in the author column, the publisher
    in the year column."""
    title = df["title"].fillna("")
    shifted = (
        title.str.contains('\\";', regex=False) & pd.to_numeric(df["year"], errors="coerce").isna()
    )
    report.record(
        "book rows shifted by an escaped quote in the title",
        int(shifted.sum()),
        len(df),
        "realigned",
    )
    if not shifted.any():
        return df
    parts = title[shifted].str.split('\\";', n=1, regex=False)
    fixed = df.loc[shifted]
    df = df.copy()
    df.loc[shifted, "title"] = parts.str[0]
    df.loc[shifted, "author"] = parts.str[1].str.strip('"')
    df.loc[shifted, "year"] = fixed["author"]
    df.loc[shifted, "publisher"] = fixed["year"]
    return df


def _has_header(path: Path, sep: str, encoding: str, first_column: str) -> bool:
    """Whether the file starts with a header line: its first field names the first column."""
    with open(path, encoding=encoding, newline="") as f:
        first = f.readline()
    field = first.lstrip("\ufeff").split(sep, 1)[0].strip().strip('"')
    return re.sub(r"[^a-z0-9]", "", field.lower()) == re.sub(r"[^a-z0-9]", "", first_column.lower())


def _rated(index: pd.Index, ids: pd.Series) -> np.ndarray:
    """Mask of the side-table rows whose id occurs in ``ids`` (a hash lookup: Arrow strings'
    ``isin`` walks a Python list)."""
    return pd.Index(ids.unique()).get_indexer(index) >= 0


def _normalise_isbn(isbn: pd.Series) -> pd.Series:
    isbn = isbn.str.strip().str.upper()
    return isbn.mask(isbn == "")


def _unescape(values: pd.Series) -> pd.Series:
    """HTML entities (``&amp;``, ``&#20013;``) decoded; only values with an ``&`` are touched."""
    has_entity = values.str.contains("&", regex=False, na=False)
    if not has_entity.any():
        return values
    values = values.copy()
    values[has_entity] = values[has_entity].map(html.unescape)
    return values


def _cap_rare(
    values: pd.Series, min_count: int, what: str, rows: str, report: CleaningReport
) -> pd.Series:
    """Values on fewer than ``min_count`` rows become missing (unknown code 0)."""
    if min_count <= 1:
        return values
    counts = values.map(values.value_counts())
    rare = values.notna() & (counts < min_count)
    report.record(
        f"{what} seen on fewer than {min_count} rated {rows}",
        int(rare.sum()),
        len(values),
        "set to unknown",
    )
    return values.mask(rare)
