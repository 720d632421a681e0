"""The generic CSV DataModule: header detection, labels, times, side features, bad input."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from recsys.train import run


def _write(tmp_path, text: str, name: str = "interactions.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _cfg(make_cfg, path, *overrides):
    return make_cfg("data=csv", f"data.path={path}", *overrides)


def _datamodule(make_cfg, path, *overrides):
    dm = instantiate(_cfg(make_cfg, path, *overrides).data)
    dm.prepare_data()
    dm.setup()
    return dm


def _error(make_cfg, path, *overrides) -> str:
    with pytest.raises(ValueError) as err:
        instantiate(_cfg(make_cfg, path, *overrides).data).prepare_data()
    return str(err.value)


@pytest.fixture
def interactions(tmp_path):
    """A seeded interaction file with times and side features, big enough to train on."""
    rng = np.random.default_rng(0)
    n_users, n_items = 60, 40
    pairs = rng.choice(n_users * n_items, size=1500, replace=False)
    users, items = pairs // n_items, pairs % n_items
    genres = np.array(["drama", "comedy", "drama|comedy", "action", ""])
    df = pd.DataFrame(
        {
            "user_id": users + 1,
            "item_id": items + 100,
            "label": (rng.random(len(pairs)) < 0.4).astype(int),
            "timestamp": rng.integers(1_500_000_000, 1_600_000_000, len(pairs)),
            "segment": np.array(["a", "b", "c"])[users % 3],
            "age": 20 + users % 40,
            "genres": genres[items % len(genres)],
            "brand": np.array(["x", "y"])[items % 2],
        }
    )
    path = tmp_path / "events.csv"
    df.to_csv(path, index=False)
    return path, df


@pytest.mark.parametrize(
    "header",
    ["userId,itemId,target", "user_id,item_id,label", "User-ID,ItemID,Label"],
)
def test_default_headers_need_no_column_map(make_cfg, tmp_path, header):
    path = _write(tmp_path, f"{header}\n1,10,1\n1,11,0\n2,10,0\n3,12,1\n")
    dm = _datamodule(make_cfg, path)
    assert dm.source == "csv-interactions" and dm.raw_dir == tmp_path
    assert dm.expected_files() == ["interactions.csv"]
    inter = dm.data.interactions
    assert len(inter) == 4 and dm.spec.num_users == 3 and dm.spec.num_items == 3
    users, items = dm.data.user_ids[inter.users], dm.data.item_ids[inter.items]
    pos = {(u, i) for u, i, y in zip(users, items, inter.labels.tolist(), strict=True) if y == 1}
    assert pos == {("1", "10"), ("3", "12")}
    assert torch.isnan(inter.ratings).all() and (inter.timestamps == -1).all()


def test_rating_column_uses_the_threshold(make_cfg, tmp_path):
    path = _write(tmp_path, "user,item,rating\n1,10,5\n1,11,3\n2,10,4\n2,12,1\n3,12,3.5\n")
    dm = _datamodule(make_cfg, path, "data.rating_threshold=3")
    inter = dm.data.interactions
    assert torch.equal(inter.labels, (inter.ratings > 3).float())
    assert sorted(inter.ratings.tolist()) == [1, 3, 3.5, 4, 5]
    ge = _datamodule(make_cfg, path, "data.rating_threshold=3", "data.threshold_op='>='")
    assert ge.data.interactions.labels.sum() == 4


def test_column_map_and_label_with_rating(make_cfg, tmp_path):
    path = _write(tmp_path, "customer;sku;clicked;stars\na;p1;1;5\na;p2;0;2\nb;p1;0;1\n")
    dm = _datamodule(
        make_cfg, path, "data.sep=';'", "data.columns.user=customer", "data.columns.item=sku"
    )
    inter = dm.data.interactions
    # both a label and a rating: the label is the label, the rating is kept
    assert inter.labels.tolist() == [1, 0, 0] and inter.ratings.tolist() == [5, 2, 1]
    assert list(dm.data.item_ids) == ["p1", "p2"]


def test_implicit_feedback_keeps_the_positive_rows(make_cfg, tmp_path):
    path = _write(tmp_path, "user_id,item_id,label,age\n1,2,1,30\n1,3,0,x\n2,3,1,40\n2,4,0,41\n")
    # the non-numeric age sits on a removed row; the error still names its line in the file
    msg = _error(make_cfg, path, "data.feedback=implicit", "data.user_features.dense=[age]")
    assert "line 3 has 'x'" in msg
    path.write_text("user_id,item_id,label\n1,2,1\n1,3,0\n2,3,1\n2,4,0\n")
    dm = _datamodule(make_cfg, path, "data.feedback=implicit")
    inter = dm.data.interactions
    assert len(inter) == 2 and (inter.labels == 1).all()
    steps = {s["step"]: s for s in dm.data.meta["report"]}
    assert steps["rows labelled 0 (feedback=implicit)"]["rows"] == 2


@pytest.mark.parametrize("columns", [["user_id", "item_id", "timestamp"], ["user_id", "item_id"]])
def test_implicit_feedback_needs_no_label_column(make_cfg, interactions, columns):
    """Under implicit feedback a file of interactions alone is every row a positive."""
    path, df = interactions
    df[columns].to_csv(path, index=False)
    dm = _datamodule(make_cfg, path, "data.feedback=implicit")
    inter = dm.data.interactions
    assert len(inter) == len(df) and (inter.labels == 1).all() and torch.isnan(inter.ratings).all()
    expected = sorted(df["timestamp"]) if "timestamp" in columns else [-1] * len(df)
    assert sorted(inter.timestamps.tolist()) == expected
    metrics = run(_cfg(make_cfg, path, "data.feedback=implicit", "debug=fdr"))
    assert metrics["test/auroc"] == metrics["test/auroc"]  # present, not NaN


def test_timestamps_and_temporal_split(make_cfg, interactions):
    path, df = interactions
    dm = _datamodule(make_cfg, path, "data.split.kind=temporal")
    inter = dm.data.interactions
    assert len(inter) == len(df)
    assert sorted(inter.timestamps.tolist()) == sorted(df["timestamp"].tolist())
    latest_train = torch.zeros(dm.spec.num_users, dtype=torch.long).scatter_reduce(
        0, inter.users[dm.rows["train"]], inter.timestamps[dm.rows["train"]], "amax"
    )
    test_rows = dm.rows["test"]
    assert len(test_rows) > 0
    assert (inter.timestamps[test_rows] >= latest_train[inter.users[test_rows]]).all()


def test_date_strings_are_unix_seconds(make_cfg, tmp_path):
    path = _write(tmp_path, "user,item,label,date\n1,10,1,2020-01-02\n1,11,0,2020-01-03 12:00:00\n")
    dm = _datamodule(make_cfg, path)
    expected = [
        int(pd.Timestamp("2020-01-02", tz="UTC").timestamp()),
        int(pd.Timestamp("2020-01-03 12:00:00", tz="UTC").timestamp()),
    ]
    assert dm.data.interactions.timestamps.tolist() == expected


def test_side_features(make_cfg, interactions, tmp_path):
    path, df = interactions
    # user 1 changes segment halfway: the first value is kept and the conflict is reported
    first = df.index[df["user_id"] == 1]
    df.loc[first[1:], "segment"] = "z"
    df.to_csv(path, index=False)
    dm = _datamodule(
        make_cfg,
        path,
        "data.user_features={categorical:[segment],dense:[age]}",
        "data.item_features={categorical:[brand],multi_hot:{genres:'|'}}",
    )
    spec = dm.spec
    assert spec.sparse_names == ["user_id", "item_id", "segment", "brand", "genres"]
    assert [(d.name, d.entity) for d in spec.dense] == [("age", "user")]
    assert next(f for f in spec.sparse if f.name == "genres").multi_hot
    steps = {s["step"]: s for s in dm.data.meta["report"]}
    assert steps["users with conflicting 'segment' values"]["rows"] == 1
    assert steps["items with conflicting 'brand' values"]["rows"] == 0
    vocab = dm.data.meta["vocab"]
    assert vocab["genres"] == ["<unknown>", "action", "comedy", "drama"]
    user = int(np.flatnonzero(dm.data.user_ids == "1")[0])
    item = int(np.flatnonzero(dm.data.item_ids == "102")[0])  # items % 5 == 2: drama|comedy
    batch = dm.data.features.make_batch(torch.tensor([user]), torch.tensor([item]))
    kjt = batch.sparse_features
    assert vocab["segment"][int(kjt["segment"].values())] == df.loc[first[0], "segment"]
    assert [vocab["genres"][c] for c in kjt["genres"].values().tolist()] == ["drama", "comedy"]
    empty = int(np.flatnonzero(dm.data.item_ids == "104")[0])  # no genres
    batch = dm.data.features.make_batch(torch.tensor([user]), torch.tensor([empty]))
    assert batch.sparse_features["genres"].lengths().tolist() == [0]
    ages = df.groupby("user_id")["age"].first()
    expected = (ages[1] - ages.mean()) / ages.std(ddof=0)
    assert batch.dense_features[0, 0].item() == pytest.approx(expected, rel=1e-5)


def test_fast_dev_run(make_cfg, interactions):
    path, _ = interactions
    metrics = run(make_cfg("data=csv", f"data.path={path}", "debug=fdr"))
    assert metrics["test/auroc"] == metrics["test/auroc"]  # present, not NaN


# --- bad input: a ValueError that names the file and the problem ------------------------


def test_missing_column_lists_the_columns(make_cfg, tmp_path):
    path = _write(tmp_path, "user_id,item_id,label\n1,2,1\n")
    msg = _error(make_cfg, path, "data.columns.timestamp=time")
    assert str(path) in msg and "'time' is not a column" in msg
    assert "['user_id', 'item_id', 'label']" in msg


def test_missing_feature_column(make_cfg, tmp_path):
    path = _write(tmp_path, "user_id,item_id,label\n1,2,1\n")
    msg = _error(make_cfg, path, "data.item_features={categorical:[brand]}")
    assert str(path) in msg and "'brand' is not a column" in msg and "'item_id'" in msg


def test_no_user_column(make_cfg, tmp_path):
    path = _write(tmp_path, "who,item_id,label\n1,2,1\n")
    msg = _error(make_cfg, path)
    assert str(path) in msg and "no user column" in msg and "data.columns.user" in msg


def test_no_label_or_rating_column(make_cfg, tmp_path):
    path = _write(tmp_path, "user_id,item_id,outcome\n1,2,1\n")
    msg = _error(make_cfg, path)
    assert "no label or rating column" in msg and "'outcome'" in msg


def test_explicit_feedback_without_label_names_the_fix(make_cfg, tmp_path):
    path = _write(tmp_path, "user_id,item_id,timestamp\n1,2,1500000000\n2,3,1500000100\n")
    msg = _error(make_cfg, path, "data.feedback=explicit")
    assert str(path) in msg and "['user_id', 'item_id', 'timestamp']" in msg
    assert "set data.feedback=implicit" in msg and "data.columns.label=" in msg


def test_ambiguous_columns(make_cfg, tmp_path):
    path = _write(tmp_path, "user,user_id,item_id,label\n1,1,2,1\n")
    msg = _error(make_cfg, path)
    assert "['user', 'user_id'] could each be the user column" in msg


def test_non_numeric_label(make_cfg, tmp_path):
    path = _write(tmp_path, "user_id,item_id,label\n1,2,1\n1,3,yes\n")
    msg = _error(make_cfg, path)
    assert str(path) in msg and "'label' must be numeric" in msg and "line 3 has 'yes'" in msg


def test_non_numeric_rating(make_cfg, tmp_path):
    path = _write(tmp_path, "user,item,rating\n1,2,4\n1,3,4\n2,2,four\n")
    msg = _error(make_cfg, path)
    assert "'rating' must be numeric" in msg and "line 4 has 'four'" in msg


def test_labels_outside_0_1(make_cfg, tmp_path):
    path = _write(tmp_path, "user_id,item_id,label\n1,2,1\n1,3,2\n2,3,-1\n")
    msg = _error(make_cfg, path)
    assert "labels 0 or 1" in msg
    assert "line 3 has '2'" in msg and "line 4 has '-1'" in msg and "(2 rows in all)" in msg


def test_empty_file(make_cfg, tmp_path):
    path = _write(tmp_path, "")
    msg = _error(make_cfg, path)
    assert str(path) in msg and "empty" in msg


def test_header_without_rows(make_cfg, tmp_path):
    path = _write(tmp_path, "user_id,item_id,label\n")
    assert "no interaction rows" in _error(make_cfg, path)


@pytest.mark.parametrize("column", ["user_id", "item_id"])
def test_missing_ids(make_cfg, tmp_path, column):
    rows = ["1,2,1", "1,3,0", "2,3,1", "4,5,0"]
    for i in (1, 3):  # lines 3 and 5
        parts = rows[i].split(",")
        parts[0 if column == "user_id" else 1] = ""
        rows[i] = ",".join(parts)
    path = _write(tmp_path, "user_id,item_id,label\n" + "\n".join(rows) + "\n")
    msg = _error(make_cfg, path)
    assert str(path) in msg and f"column {column!r} has no value at lines 3, 5" in msg


def test_bad_timestamp(make_cfg, tmp_path):
    path = _write(
        tmp_path,
        "user_id,item_id,label,timestamp\n1,2,1,1500000000\n1,3,0,soon\n2,2,0,1500000100\n",
    )
    msg = _error(make_cfg, path)
    assert re.search(r"'timestamp' must hold unix times \(numbers\), but line 3 has 'soon'", msg)


def test_missing_file(make_cfg, tmp_path):
    path = tmp_path / "nowhere.csv"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{path} does not exist; set data.path")):
        instantiate(_cfg(make_cfg, path).data).prepare_data()


# --- row features: each interaction row's own values ------------------------------------

ROW_FEATURES = "data.row_features={categorical:[device],multi_hot:{tags:';'},dense:[hour]}"


@pytest.fixture
def with_row_features(interactions):
    """`interactions` with row feature columns, and one (user, item) pair repeated earlier
    with other row values (the older copy is removed, its row features with it)."""
    path, df = interactions
    rng = np.random.default_rng(1)
    df = df.assign(
        device=rng.choice(["mobile", "desktop", ""], len(df)),
        tags=rng.choice(["promo", "promo;new", "", "new"], len(df)),
        hour=rng.integers(0, 24, len(df)),
    )
    older = df.iloc[[0]].assign(
        timestamp=df["timestamp"].iloc[0] - 10, device="tablet", tags="old", hour=99
    )
    df = pd.concat([df, older], ignore_index=True)
    df.to_csv(path, index=False)
    return path, df


def test_row_features(make_cfg, with_row_features):
    path, df = with_row_features
    dm = _datamodule(make_cfg, path, ROW_FEATURES)
    spec = dm.spec
    assert spec.has_ids and spec.sparse_names == ["user_id", "item_id", "device", "tags"]
    assert [(f.name, f.entity, f.multi_hot) for f in spec.row_features()] == [
        ("device", "row", False),
        ("tags", "row", True),
    ]
    assert [(d.name, d.entity) for d in spec.dense] == [("hour", "row")]
    # codes and standardisation are of every row of the file, the older copies included
    vocab = dm.data.meta["vocab"]
    assert "tablet" in vocab["device"] and "old" in vocab["tags"]
    inter = dm.data.interactions
    assert len(inter) == len(df) - 1
    kept = df.iloc[:-1]
    assert len(inter.row) == len(kept)
    # row i of the processed interactions is row i of the file (older copy removed)
    users = dm.data.user_ids[inter.users.numpy()]
    assert (users == kept["user_id"].astype(str).to_numpy()).all()
    device = [vocab["device"][c] for c in inter.row.codes["device"].tolist()]
    assert device == kept["device"].replace("", "<unknown>").tolist()
    assert inter.row.codes["device"].dtype == torch.int32
    offsets, values = inter.row.lists["tags"]
    for i in (0, 1, 2, 3, 500):
        tokens = [vocab["tags"][c] for c in values[offsets[i] : offsets[i + 1]].tolist()]
        expected = [t for t in kept["tags"].iloc[i].split(";") if t] if kept["tags"].iloc[i] else []
        assert tokens == expected, i
    hours = df["hour"].to_numpy(np.float64)
    expected = (hours - hours.mean()) / hours.std()
    assert inter.row.dense[:, 0].numpy() == pytest.approx(expected[:-1], rel=1e-4, abs=1e-5)
    # a training batch carries them: the KJT's keys and the dense column
    batch = next(iter(dm.train_dataloader()))
    assert batch.sparse_features.keys() == ["user_id", "item_id", "device", "tags"]
    assert batch.dense_features.shape == (len(batch), 1)


def test_row_features_change_the_cache_key(make_cfg, with_row_features):
    path, _ = with_row_features
    dirs = {
        instantiate(_cfg(make_cfg, path, *o).data).processed_dir
        for o in ([], [ROW_FEATURES], ["data.row_features={categorical:[device]}"])
    }
    assert len(dirs) == 3


def test_a_bad_row_dense_value_names_the_column_and_line(make_cfg, with_row_features):
    path, df = with_row_features
    df["hour"] = df["hour"].astype(str)
    df.loc[4, "hour"] = "noon"
    df.to_csv(path, index=False)
    msg = _error(make_cfg, path, ROW_FEATURES)
    assert str(path) in msg and "'hour' must be numeric" in msg and "line 6 has 'noon'" in msg


@pytest.mark.parametrize(
    ("setting", "why"),
    [("data.feedback=implicit", "feedback=implicit"), ("data.ranking=sampled", "ranking=sampled")],
)
def test_row_features_refuse_sampled_items(make_cfg, with_row_features, setting, why):
    path, _ = with_row_features
    with pytest.raises(Exception, match=rf"data.row_features=.*{why}.*has no row to take it"):
        instantiate(_cfg(make_cfg, path, ROW_FEATURES, setting).data)


def test_dlrm_trains_on_row_features(make_cfg, with_row_features):
    path, _ = with_row_features
    metrics = run(_cfg(make_cfg, path, ROW_FEATURES, "model=dlrm", "trainer.max_epochs=1"))
    assert np.isfinite(metrics["test/auroc"]) and np.isfinite(metrics["test/logloss"])
