"""Book-Crossing on the real files (Kaggle layout) and on an original-layout folder.

The shared files are subsets of the full release: every expected count is computed here from
the raw files with pandas, never written down.
"""

from __future__ import annotations

import datetime
import logging
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from recsys.data.split import split_indices
from recsys.train import run

SLICE = "extras/LaxmiVanam_BX-Book-Ratings_slice.csv"


def _datamodule(make_cfg, *overrides):
    dm = instantiate(make_cfg("data=books", *overrides).data)
    dm.prepare_data()
    dm.setup()
    return dm


def _steps(dm) -> dict[str, dict]:
    return {s["step"]: s for s in dm.data.meta["report"]}


def _step(dm, prefix: str) -> dict:
    (found,) = [s for name, s in _steps(dm).items() if name.startswith(prefix)]
    return found


def _isbn(values: pd.Series) -> pd.Series:
    return values.str.strip().str.upper()


@pytest.fixture(scope="module")
def raw(data_dir):
    """The Kaggle-layout files as pandas reads them, ISBNs normalised."""
    d = data_dir / "book-crossing"
    ratings = pd.read_csv(d / "Ratings.csv", dtype={"ISBN": str})
    ratings["ISBN"] = _isbn(ratings["ISBN"])
    books = pd.read_csv(d / "Books.csv", dtype=str)
    books["ISBN"] = _isbn(books["ISBN"])
    users = pd.read_csv(d / "Users.csv")
    return ratings, books, users


def _explicit(ratings: pd.DataFrame) -> pd.DataFrame:
    explicit = ratings[ratings["Book-Rating"] > 0]
    return explicit.drop_duplicates(["User-ID", "ISBN"], keep="last")


def test_explicit_counts_labels_and_features(make_cfg, raw):
    ratings, _, _ = raw
    dm = _datamodule(make_cfg)
    expected = _explicit(ratings)
    inter = dm.data.interactions
    assert len(inter) == len(expected)
    assert dm.spec.num_users == expected["User-ID"].nunique()
    assert dm.spec.num_items == expected["ISBN"].nunique()
    assert (
        _step(dm, "implicit interactions (rating 0")["rows"] == (ratings["Book-Rating"] == 0).sum()
    )
    # label = rating >= 6 (conf/data/books.yaml), no timestamps
    assert torch.equal(inter.labels, (inter.ratings >= 6).float())
    assert inter.labels.sum() == (expected["Book-Rating"] >= 6).sum()
    assert (inter.timestamps == -1).all()
    assert dm.spec.sparse_names == [
        "user_id",
        "item_id",
        "author",
        "publisher",
        "year",
        "age",
        "country",
    ]
    assert [d.name for d in dm.spec.dense] == ["age_value", "pub_year"]
    assert dm.data.meta["settings"]["feedback"] == "explicit"
    # ISBNs are upper-cased: "039592720x" in Ratings.csv is the same book as "039592720X"
    assert "039592720X" in set(dm.data.item_ids) and "039592720x" not in set(dm.data.item_ids)
    with pytest.raises(ValueError, match="needs timestamps"):
        split_indices(inter, "temporal", 0.1, 0.1, seed=0)


def test_report_counts_ratings_without_a_book_row(make_cfg, raw, caplog):
    """The printed report line equals what pandas computes from the files."""
    ratings, books, _ = raw
    caplog.set_level(logging.INFO, logger="recsys.data.base")
    dm = _datamodule(make_cfg, "data.rebuild=true")
    expected = _explicit(ratings)
    no_book = int((~expected["ISBN"].isin(books["ISBN"])).sum())
    assert 0 < no_book < len(expected)
    line = "interactions whose item has no row in the item file: kept with unknown features: "
    printed = re.search(re.escape(line) + r"([\d,]+) of ([\d,]+) rows", caplog.text)
    assert printed is not None, caplog.text
    assert printed.groups() == (f"{no_book:,}", f"{len(expected):,}")
    # those books have unknown (0) codes and an empty title
    without = ~np.isin(dm.data.item_ids, books["ISBN"].to_numpy())
    assert without.sum() == expected.loc[~expected["ISBN"].isin(books["ISBN"]), "ISBN"].nunique()
    item = int(np.flatnonzero(without)[0])
    batch = dm.data.features.make_batch(torch.tensor([0]), torch.tensor([item]))
    for name in ("author", "publisher", "year"):
        assert int(batch.sparse_features[name].values()) == 0
    assert dm.data.item_info["title"][item] == ""


def test_age_year_country_cleaning(make_cfg, raw):
    ratings, books, users = raw
    dm = _datamodule(make_cfg)
    vocab = dm.data.meta["vocab"]
    feats = dm.data.features
    user_code = {raw_id: code for code, raw_id in enumerate(dm.data.user_ids)}
    item_code = {raw_id: code for code, raw_id in enumerate(dm.data.item_ids)}

    def user_batch(user_id):
        return feats.make_batch(torch.tensor([user_code[str(user_id)]]), torch.tensor([0]))

    # ages outside 5-100 are missing: bucket 0, standardised value 0 (the mean)
    bad_age = (users["Age"] < 5) | (users["Age"] > 100)
    assert _step(dm, "user ages outside 5-100")["rows"] == bad_age.sum()
    rated = users[users["User-ID"].isin(ratings["User-ID"])]
    for _, row in rated[(rated["Age"] > 100) | (rated["Age"] < 5)].head(3).iterrows():
        b = user_batch(row["User-ID"])
        assert int(b.sparse_features["age"].values()) == 0 and b.dense_features[0, 0] == 0
    young = rated[rated["Age"].between(5, 17)].iloc[0]
    b = user_batch(young["User-ID"])
    assert vocab["age"][int(b.sparse_features["age"].values())] == "[-inf, 18)"

    # country: the last part of the location, lower-case; "n/a" and "" are unknown
    country = rated["Location"].str.rsplit(",", n=1).str[-1].str.strip().str.lower()
    usa = rated[country == "usa"].iloc[0]
    assert (
        vocab["country"][int(user_batch(usa["User-ID"]).sparse_features["country"].values())]
        == "usa"
    )
    for _, row in rated[country.isin(["n/a", ""])].head(3).iterrows():
        assert int(user_batch(row["User-ID"]).sparse_features["country"].values()) == 0

    # publication year 0 (or later than this year) is missing
    year = pd.to_numeric(books["Year-Of-Publication"], errors="coerce")
    invalid = ~year.between(1, datetime.date.today().year)
    assert _step(dm, "publication years that are not a year")["rows"] == invalid.sum()
    rated_books = books[books["ISBN"].isin(ratings["ISBN"])]
    zero = rated_books[year[rated_books.index] == 0].iloc[0]
    b = feats.make_batch(torch.tensor([0]), torch.tensor([item_code[zero["ISBN"]]]))
    assert int(b.sparse_features["year"].values()) == 0 and b.dense_features[0, 1] == 0
    good = rated_books[year[rated_books.index].between(1990, 1994)].iloc[0]
    b = feats.make_batch(torch.tensor([0]), torch.tensor([item_code[good["ISBN"]]]))
    assert vocab["year"][int(b.sparse_features["year"].values())] == "[1990, 1995)"

    # HTML entities are decoded in titles
    amp = rated_books[rated_books["Book-Title"].str.contains("&amp;")].iloc[0]
    title = dm.data.item_info["title"][item_code[amp["ISBN"]]]
    assert title == amp["Book-Title"].replace("&amp;", "&") and "&amp;" not in title

    # display fields: the author as written (not capped like the feature), year, cover URL
    info = dm.data.item_info.iloc[item_code[good["ISBN"]]]
    assert info["author"] == good["Book-Author"].strip()
    assert info["year"] == str(int(good["Year-Of-Publication"]))
    assert info["image_url"] == good["Image-URL-M"] and info["image_url"].startswith("http")
    assert dm.data.item_info.iloc[item_code[zero["ISBN"]]]["year"] == ""


def test_implicit_keeps_every_interaction_as_positive(make_cfg, raw):
    ratings, _, _ = raw
    dm = _datamodule(make_cfg, "data.feedback=implicit")
    inter = dm.data.interactions
    expected = ratings.drop_duplicates(["User-ID", "ISBN"], keep="last")
    assert len(inter) == len(expected)
    assert (inter.labels == 1).all()
    assert inter.ratings.sum() == expected["Book-Rating"].sum()  # ratings kept as they are
    assert not any(s.startswith("implicit interactions") for s in _steps(dm))
    explicit = _datamodule(make_cfg)
    assert dm.processed_dir != explicit.processed_dir


def test_k_core_filter(make_cfg, raw):
    ratings, _, _ = raw
    dm = _datamodule(make_cfg, "data.min_user_interactions=5", "data.min_item_interactions=3")
    inter = dm.data.interactions
    assert torch.bincount(inter.users).min() >= 5 and torch.bincount(inter.items).min() >= 3
    # the same filter in plain pandas
    kept = _explicit(ratings)
    while True:
        users = kept.groupby("User-ID")["ISBN"].transform("size")
        items = kept.groupby("ISBN")["User-ID"].transform("size")
        drop = (users < 5) | (items < 3)
        if not drop.any():
            break
        kept = kept[~drop]
    assert len(inter) == len(kept) > 0
    assert dm.spec.num_users == kept["User-ID"].nunique()
    assert dm.spec.num_items == kept["ISBN"].nunique()
    step = _step(dm, "k-core filter")
    assert step["rows"] == len(_explicit(ratings)) - len(kept)


def test_missing_files_error_names_both_layouts(make_cfg, tmp_path):
    cfg = make_cfg("data=books", f"paths.data_dir={tmp_path}")
    with pytest.raises(FileNotFoundError) as err:
        instantiate(cfg.data).prepare_data()
    msg = str(err.value)
    assert str(tmp_path / "book-crossing") in msg and "no official download" in msg
    for name in ("Books.csv", "Users.csv", "Ratings.csv", "BX-Books.csv", "BX-Users.csv"):
        assert name in msg
    assert "BX-Book-Ratings.csv" in msg


def test_small_kaggle_folder(make_cfg, tmp_path):
    """Quirks of the full Kaggle files: a row shifted by the original's escaped quote, ISBNs
    in other cases, ratings of books and users without a row."""
    folder = tmp_path / "book-crossing"
    folder.mkdir()
    url = "http://images.amazon.com/images/P/078946697X.01.{}.jpg"
    pd.DataFrame(
        {
            "ISBN": ["078946697X", "0195153448"],
            "Book-Title": [
                'DK Readers: Creating the X-Men (Level 4: Proficient Readers)\\";Michael '
                'Teitelbaum"',
                "Classical Mythology",
            ],
            "Book-Author": ["2000", "Mark P. O. Morford"],
            "Year-Of-Publication": ["DK Publishing Inc", "2002"],
            "Publisher": [url.format("THUMBZZZ"), "Oxford University Press"],
            "Image-URL-S": [url.format("MZZZZZZZ"), "s"],
            "Image-URL-M": [url.format("LZZZZZZZ"), "m"],
            "Image-URL-L": [None, "l"],
        }
    ).to_csv(folder / "Books.csv", index=False)
    pd.DataFrame(
        {
            "User-ID": [1, 2],
            "Location": ["nyc, new york, usa", "porto, portugal"],
            "Age": [30, None],
        }
    ).to_csv(folder / "Users.csv", index=False)
    pd.DataFrame(
        {
            "User-ID": [1, 1, 2, 3, 3],
            "ISBN": ["078946697x", " 0195153448", "0195153448", "0000000000", "078946697X"],
            "Book-Rating": [8, 0, 3, 7, 10],
        }
    ).to_csv(folder / "Ratings.csv", index=False)
    dm = _datamodule(make_cfg, f"paths.data_dir={tmp_path}", "data.min_count=1")
    assert dm.data.meta["settings"]["layout"] == "kaggle"
    assert _step(dm, "book rows shifted by an escaped quote")["rows"] == 1
    assert _step(dm, "implicit interactions (rating 0")["rows"] == 1
    assert _step(dm, "interactions whose item has no row")["rows"] == 1  # 0000000000
    assert _step(dm, "interactions whose user has no row")["rows"] == 2  # user 3
    assert list(dm.data.item_ids) == ["0000000000", "0195153448", "078946697X"]
    assert dm.data.item_info["title"].tolist() == [
        "",
        "Classical Mythology",
        "DK Readers: Creating the X-Men (Level 4: Proficient Readers)",
    ]
    vocab = dm.data.meta["vocab"]
    assert vocab["author"] == ["<unknown>", "Mark P. O. Morford", "Michael Teitelbaum"]
    assert vocab["publisher"] == ["<unknown>", "DK Publishing Inc", "Oxford University Press"]
    batch = dm.data.features.make_batch(torch.tensor([0]), torch.tensor([2]))
    assert vocab["year"][int(batch.sparse_features["year"].values())] == "[2000, 2005)"


# --- the original layout: ";"-separated, quoted, Latin-1, CRLF, MySQL-style escapes --------

BOOK_ROWS = [
    r'"{0}";"Of Mice and Men (Steinbeck \"Essentials\")";"John Steinbeck";"2001";"Penguin";'
    r'"http://s";"http://m";"http://l"',
    r'"{1}";"DK Readers: Creating the X-Men (Level 4: Proficient Readers)\";"Michael '
    r'Teitelbaum";"2000";"DK Publishing Inc";"http://s";"http://m";"http://l"',
    r'"{2}";"Angels &amp; Demons";"Dan Brown";"0";"Pocket Books";"http://s";"http://m";"http://l"',
    r'"{3}";"L' + "\u00e9" + r'tranger";"Albert Camus";"2050";"Gallimard";"http://s";"http://m";'
    r'"http://l"',
    r'"{4}";"A "broken" title; in two";"Some Author";"1999";"X";"http://s";"http://m";"http://l"',
    r'"{5}";"Digital Fortress";"Dan Brown";"1998";"St. Martin&#39;s Press";"http://s";'
    r'"http://m";"http://l"',
]


@pytest.fixture
def original_folder(data_dir, tmp_path):
    """``<tmp>/book-crossing`` in the original layout: the real ratings slice (no header
    line), books and users files written here with the original's quirks."""
    folder = tmp_path / "book-crossing"
    folder.mkdir()
    shutil.copy(data_dir / "book-crossing" / SLICE, folder / "BX-Book-Ratings.csv")
    slice_ = pd.read_csv(
        folder / "BX-Book-Ratings.csv", sep=";", header=None, dtype=str, encoding="latin-1"
    )
    isbns = slice_.loc[slice_[2] != "0", 1].drop_duplicates().head(len(BOOK_ROWS)).tolist()
    header = (
        '"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";'
        '"Image-URL-S";"Image-URL-M";"Image-URL-L"'
    )
    lines = [header, *(row.replace(f"{{{i}}}", isbns[i]) for i, row in enumerate(BOOK_ROWS))]
    (folder / "BX-Books.csv").write_bytes("\r\n".join(lines).encode("latin-1") + b"\r\n")
    users = slice_.loc[slice_[2] != "0", 0].drop_duplicates().head(5).tolist()
    user_rows = [
        '"User-ID";"Location";"Age"',
        f'"{users[0]}";"berlin, berlin, germany";NULL',
        f'"{users[1]}";"madrid, madrid, spain";"244"',
        f'"{users[2]}";"n/a, n/a, n/a";"3"',
        f'"{users[3]}";"z\u00fcrich, z\u00fcrich, switzerland";"34"',
        f'"{users[4]}";"toronto, ontario, canada";"25"',
    ]
    (folder / "BX-Users.csv").write_bytes("\r\n".join(user_rows).encode("latin-1") + b"\r\n")
    return folder, slice_, isbns, users


@pytest.mark.parametrize("ratings_header", [False, True])
def test_original_layout(make_cfg, original_folder, ratings_header):
    folder, slice_, isbns, users = original_folder
    if ratings_header:  # the full original file starts with a header line
        body = (folder / "BX-Book-Ratings.csv").read_bytes()
        (folder / "BX-Book-Ratings.csv").write_bytes(b'"User-ID";"ISBN";"Book-Rating"\r\n' + body)
    dm = _datamodule(make_cfg, f"paths.data_dir={folder.parent}", "data.min_count=1")
    assert dm.data.meta["settings"]["layout"] == "original"
    explicit = slice_[slice_[2] != "0"].drop_duplicates([0, 1], keep="last")
    inter = dm.data.interactions
    assert len(inter) == len(explicit)
    assert dm.spec.num_users == explicit[0].nunique()
    assert _step(dm, "implicit interactions (rating 0")["rows"] == (slice_[2] == "0").sum()
    assert _step(dm, "BX-Book-Ratings.csv: rows that could not be parsed")["rows"] == 0
    # the row with a stray quote has 9 fields: skipped and reported, not silently lost
    assert _step(dm, "BX-Books.csv: rows that could not be parsed")["rows"] == 1
    no_book = _step(dm, "interactions whose item has no row in the item file")
    has_row = [i for k, i in enumerate(isbns) if k != 4]
    assert no_book["rows"] == (~explicit[1].isin(has_row)).sum()

    item = {raw_id: code for code, raw_id in enumerate(dm.data.item_ids)}
    titles = {i: dm.data.item_info["title"][item[i]] for i in isbns}
    assert titles[isbns[0]] == 'Of Mice and Men (Steinbeck "Essentials")'
    assert titles[isbns[1]] == "DK Readers: Creating the X-Men (Level 4: Proficient Readers)"
    assert titles[isbns[2]] == "Angels & Demons"
    assert titles[isbns[3]] == "L\u00e9tranger"  # Latin-1 decoded
    assert titles[isbns[4]] == ""  # unparseable row: unknown book
    vocab = dm.data.meta["vocab"]
    assert "Michael Teitelbaum" in vocab["author"]
    assert "St. Martin's Press" in vocab["publisher"]
    assert _step(dm, "publication years that are not a year")["rows"] == 2  # 0 and 2050

    # NULL is a missing age, not an invalid one; 244 and 3 are invalid
    assert _step(dm, "user ages outside 5-100")["rows"] == 2
    user = {raw_id: code for code, raw_id in enumerate(dm.data.user_ids)}
    b = dm.data.features.make_batch(
        torch.tensor([user[u] for u in users]), torch.zeros(5, dtype=torch.long)
    )
    countries = [vocab["country"][c] for c in b.sparse_features["country"].values().tolist()]
    assert countries == ["germany", "spain", "<unknown>", "switzerland", "canada"]
    ages = [vocab["age"][c] for c in b.sparse_features["age"].values().tolist()]
    assert ages == ["<unknown>", "<unknown>", "<unknown>", "[25, 35)", "[25, 35)"]


def test_original_layout_implicit_and_min_count(make_cfg, original_folder):
    folder, slice_, isbns, _ = original_folder
    dm = _datamodule(make_cfg, f"paths.data_dir={folder.parent}", "data.feedback=implicit")
    assert len(dm.data.interactions) == len(slice_.drop_duplicates([0, 1]))
    assert (dm.data.interactions.labels == 1).all()
    # min_count=2: only Dan Brown has two books; every other author is unknown
    assert dm.data.meta["vocab"]["author"] == ["<unknown>", "Dan Brown"]
    assert _step(dm, "authors seen on fewer than 2 rated books")["rows"] == 3


@pytest.mark.parametrize("feedback", ["explicit", "implicit"])
def test_fast_dev_run(make_cfg, feedback):
    metrics = run(make_cfg("data=books", f"data.feedback={feedback}", "debug=fdr"))
    assert metrics["test/auroc"] == metrics["test/auroc"]  # present, not NaN
