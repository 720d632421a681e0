"""MovieLens 100K / 1M (GroupLens ``::`` and ``|`` layouts) and 20M / 25M (CSV layout)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data.base import RecDataModule
from recsys.data.download import download_and_extract
from recsys.data.preprocess import (
    INFO,
    CleaningReport,
    ProcessedData,
    assemble,
    bucketize,
    encode_categorical,
    label_from_rating,
    multi_hot_from_flags,
    multi_hot_from_lists,
    standardize,
    year_text,
)
from recsys.data.spec import DenseFeature, SparseFeature
from recsys.errors import InputError, MissingInputError

log = logging.getLogger(__name__)

GROUPLENS = "https://files.grouplens.org/datasets/movielens"
# md5 of the official archives, as published by GroupLens next to each zip
ARCHIVE_MD5 = {
    "100k": "0e33842e24a9c977be4e0107933c0723",
    "1m": "c4d9eecfca2ab87c1945afe126590906",
    "20m": "cd245b17a1ae2cc31bb14903e1204af3",
    "25m": "6b51fb2759a8657d3bfcbfc42b592ada",
}
FILES = {
    "100k": ["u.data", "u.item", "u.user", "u.genre"],
    "1m": ["ratings.dat", "movies.dat", "users.dat"],
    "20m": ["ratings.csv", "movies.csv"],
    "25m": ["ratings.csv", "movies.csv"],
}
# ml-1m's age codes are the lower bounds of these groups; ml-100k ages fall into the same ones
AGE_EDGES = [18, 25, 35, 45, 50, 56]
YEAR_EDGES = list(range(1930, 2030, 10))


class MovieLensDataModule(RecDataModule):
    """MovieLens ratings with user and movie side features.

    Sparse features: ``user_id``, ``item_id``, ``genres`` (multi-hot), ``gender``, ``age``
    (bucketed), ``occupation``, ``zip`` (first ``zip_prefix`` characters), ``year`` (release
    decade). Dense: ``age`` and ``release year``, standardised. ml-20m/25m have no user file:
    movie features only. Label: ``rating > 3`` by default (``rating_threshold``,
    ``threshold_op``).

    Args:
        variant: ``100k``, ``1m``, ``20m`` or ``25m``; raw files in ``<data_dir>/ml-<variant>``.
        download: fetch the GroupLens archive when the files are missing.
        zip_prefix: characters of the zip code kept as a feature.
        **kwargs: see `RecDataModule`.
    """

    def __init__(self, variant: str = "100k", download: bool = True, zip_prefix: int = 3, **kwargs):
        if variant not in FILES:
            raise InputError(f"data.variant={variant!r} is not one of {list(FILES)}")
        super().__init__(**kwargs)
        self.variant = variant
        self.allow_download = download
        self.zip_prefix = zip_prefix

    @property
    def source(self) -> str:
        return f"ml-{self.variant}"

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / self.source

    def expected_files(self) -> list[str]:
        return FILES[self.variant]

    def settings(self) -> dict:
        return {**super().settings(), "zip_prefix": self.zip_prefix}

    def download(self) -> None:
        if not self.allow_download:
            raise MissingInputError(self._missing_message() + " (data.download=false)")
        url = f"{GROUPLENS}/{self.source}.zip"
        try:
            download_and_extract(url, ARCHIVE_MD5[self.variant], self.data_dir)
        except OSError as e:
            raise MissingInputError(
                f"{self._missing_message()} Downloading {url} failed: {e}"
            ) from e

    def preprocess(self) -> ProcessedData:
        report = CleaningReport(self.source)
        reader = {"100k": self._read_100k, "1m": self._read_1m}.get(self.variant, self._read_csv)
        ratings, users, items = reader()
        ratings = report.drop(
            ratings,
            ratings[["user", "item", "rating"]].isna().any(axis=1),
            "rows with a missing user, item or rating",
        )
        ratings["label"] = label_from_rating(
            ratings["rating"], self.rating_threshold, self.threshold_op
        )
        vocab, sparse, dense = {}, [], []
        items = self._item_features(items, vocab, sparse, dense)
        if users is not None:
            users = self._user_features(users, vocab, sparse, dense)
        return assemble(report, ratings, users, items, sparse, dense, vocab)

    # --- readers: raw files -> (ratings, users, items) with raw columns ------------------
    def _read_100k(self):
        d = self.raw_dir
        ratings = pd.read_csv(
            d / "u.data", sep="\t", header=None, names=["user", "item", "rating", "timestamp"]
        )
        genres = pd.read_csv(
            d / "u.genre", sep="|", header=None, names=["name", "idx"], encoding="latin-1"
        ).dropna()
        genre_names = genres.sort_values("idx")["name"].tolist()
        cols = ["item", "title", "release", "video", "url", *genre_names]
        items = pd.read_csv(d / "u.item", sep="|", header=None, names=cols, encoding="latin-1")
        items["year"] = pd.to_datetime(items["release"], format="%d-%b-%Y", errors="coerce").dt.year
        items["genres"], self._genre_vocab = multi_hot_from_flags(
            items[genre_names].to_numpy(), genre_names
        )
        users = pd.read_csv(
            d / "u.user",
            sep="|",
            header=None,
            names=["user", "age", "gender", "occupation", "zip"],
            encoding="latin-1",
            dtype={"zip": str},
        )
        return ratings, users, items[["item", "title", "year", "genres"]]

    def _read_1m(self):
        d = self.raw_dir
        # "::" separated; reading on ":" with every other column keeps the fast C parser
        ratings = pd.read_csv(
            d / "ratings.dat",
            sep=":",
            header=None,
            usecols=[0, 2, 4, 6],
            names=["user", "item", "rating", "timestamp"],
            engine="c",
        )
        users = pd.read_csv(
            d / "users.dat",
            sep=":",
            header=None,
            usecols=[0, 2, 4, 6, 8],
            names=["user", "gender", "age", "occupation", "zip"],
            dtype={"zip": str, "occupation": str},
            encoding="latin-1",
        )
        movies = pd.read_csv(
            d / "movies.dat",
            sep="::",
            header=None,
            engine="python",
            names=["item", "title", "genres"],
            encoding="latin-1",
        )
        return ratings, users, self._movies_with_title_year(movies)

    def _read_csv(self):
        d = self.raw_dir
        ratings = pd.read_csv(d / "ratings.csv").rename(
            columns={"userId": "user", "movieId": "item"}
        )
        movies = pd.read_csv(d / "movies.csv").rename(columns={"movieId": "item"})
        movies["genres"] = movies["genres"].replace("(no genres listed)", "")
        return ratings, None, self._movies_with_title_year(movies)

    def _movies_with_title_year(self, movies: pd.DataFrame) -> pd.DataFrame:
        movies["year"] = pd.to_numeric(
            movies["title"].str.extract(r"\((\d{4})\)\s*$", expand=False), errors="coerce"
        )
        tokens = movies["genres"].fillna("").str.split("|").map(lambda g: [t for t in g if t])
        movies["genres"], self._genre_vocab = multi_hot_from_lists(tokens)
        return movies[["item", "title", "year", "genres"]]

    # --- features ---------------------------------------------------------------------------
    def _item_features(self, items, vocab, sparse, dense) -> pd.DataFrame:
        items = items.drop_duplicates("item").set_index("item")
        vocab["genres"] = self._genre_vocab
        sparse.append(SparseFeature("genres", "item", len(vocab["genres"]), multi_hot=True))
        year_codes, vocab["year"] = bucketize(items["year"], YEAR_EDGES)
        sparse.append(SparseFeature("year", "item", len(vocab["year"])))
        dense.append(DenseFeature("release_year", "item"))
        names = np.array(vocab["genres"], dtype=object)
        return pd.DataFrame(
            {
                "title": items["title"].astype(str),
                "genres": items["genres"].array,
                "year": year_codes,
                "release_year": standardize(items["year"]),
                INFO + "year": year_text(items["year"]),
                INFO + "genres": ["|".join(names[list(c)]) for c in items["genres"].tolist()],
            },
            index=items.index,
        )

    def _user_features(self, users, vocab, sparse, dense) -> pd.DataFrame:
        users = users.drop_duplicates("user").set_index("user")
        out = pd.DataFrame(index=users.index)
        zips = users["zip"].astype(str).str.strip().str[: self.zip_prefix]
        for name, values in (
            ("gender", users["gender"]),
            ("occupation", users["occupation"]),
            ("zip", zips),
        ):
            out[name], vocab[name] = encode_categorical(values)
        out["age"], vocab["age"] = bucketize(users["age"], AGE_EDGES)
        out["age_value"] = standardize(users["age"])
        for name in ("gender", "age", "occupation", "zip"):
            sparse.append(SparseFeature(name, "user", len(vocab[name])))
        dense.insert(0, DenseFeature("age_value", "user"))
        return out
