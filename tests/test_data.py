"""Preprocessing, caching, splits and batches on the real MovieLens files."""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

import recsys.data.movielens as movielens
from recsys.data.download import download_and_extract
from recsys.data.loader import BatchIndexSampler
from recsys.data.store import ragged_gather


def _datamodule(make_cfg, *overrides):
    dm = instantiate(make_cfg("data=movielens", *overrides).data)
    dm.prepare_data()
    dm.setup()
    return dm


def test_ml100k_parsed_with_side_features(make_cfg, data_dir):
    dm = _datamodule(make_cfg, "data.variant=100k")
    raw = pd.read_csv(data_dir / "ml-100k" / "u.data", sep="\t", header=None)
    assert len(dm.data.interactions) == len(raw)
    assert dm.spec.num_users == raw[0].nunique()
    assert dm.spec.num_items == raw[1].nunique()
    assert dm.spec.sparse_names == [
        "user_id",
        "item_id",
        "genres",
        "year",
        "gender",
        "age",
        "occupation",
        "zip",
    ]
    assert [d.name for d in dm.spec.dense] == ["age_value", "release_year"]
    # labels are rating > 3
    assert torch.equal(dm.data.interactions.labels, (dm.data.interactions.ratings > 3).float())
    # Toy Story (item 1): Animation, Children's, Comedy; 1995
    toy = int((dm.data.item_ids == "1").nonzero()[0][0])
    batch = dm.data.features.make_batch(torch.tensor([0]), torch.tensor([toy]))
    vocab = dm.data.meta["vocab"]
    genres = [vocab["genres"][c] for c in batch.sparse_features["genres"].values().tolist()]
    assert genres == ["Animation", "Children's", "Comedy"]
    assert vocab["year"][int(batch.sparse_features["year"].values())] == "[1990, 2000)"
    info = dm.data.item_info.iloc[toy]
    assert (info["title"], info["year"]) == ("Toy Story (1995)", "1995")
    assert info["genres"] == "Animation|Children's|Comedy"  # display text, not the codes


def test_ml1m_parsed(make_cfg, data_dir):
    """ml-1m here is a subset of the ratings: counts come from the files, never constants."""
    dm = _datamodule(make_cfg, "data.variant=1m")
    raw = pd.read_csv(
        data_dir / "ml-1m" / "ratings.dat",
        sep="::",
        engine="python",
        header=None,
        names=["u", "i", "r", "t"],
    )
    inter = dm.data.interactions
    assert len(inter) == len(raw)
    assert dm.spec.num_users == raw.u.nunique() and dm.spec.num_items == raw.i.nunique()
    first = raw.iloc[0]
    user = int((dm.data.user_ids == str(first.u)).nonzero()[0][0])
    item = int((dm.data.item_ids == str(first.i)).nonzero()[0][0])
    row = int(((inter.users == user) & (inter.items == item)).nonzero()[0][0])
    assert inter.ratings[row] == first.r and inter.timestamps[row] == first.t
    vocab = dm.data.meta["vocab"]
    assert vocab["gender"] == ["<unknown>", "F", "M"]
    assert len(vocab["genres"]) == 1 + 18
    # user 1 is F, age code 1 (under 18)
    u1 = int((dm.data.user_ids == "1").nonzero()[0][0])
    b = dm.data.features.make_batch(torch.tensor([u1]), torch.tensor([0]))
    assert vocab["gender"][int(b.sparse_features["gender"].values())] == "F"
    assert vocab["age"][int(b.sparse_features["age"].values())] == "[-inf, 18)"


def test_cache_reused_and_keyed_by_settings(make_cfg):
    dm = _datamodule(make_cfg, "data.variant=100k")
    meta = dm.processed_dir / "meta.json"
    stamp = meta.stat().st_mtime_ns
    again = _datamodule(make_cfg, "data.variant=100k")
    assert again.processed_dir == dm.processed_dir and meta.stat().st_mtime_ns == stamp
    other = _datamodule(make_cfg, "data.variant=100k", "data.rating_threshold=4")
    assert other.processed_dir != dm.processed_dir
    assert other.data.interactions.labels.sum() < dm.data.interactions.labels.sum()


def test_report_counts_are_saved(make_cfg, data_dir):
    dm = _datamodule(make_cfg, "data.variant=100k")
    raw_rows = len((data_dir / "ml-100k" / "u.data").read_text().splitlines())
    steps = {s["step"]: s for s in dm.data.meta["report"]}
    missing = steps["rows with a missing user, item or rating"]
    assert missing["rows"] == 0 and missing["of"] == raw_rows
    assert dm.data.meta["num_interactions"] == raw_rows


@pytest.mark.parametrize("kind", ["random", "temporal", "leave_one_out"])
def test_splits_partition_rows(make_cfg, kind):
    dm = _datamodule(make_cfg, "data.variant=100k", f"data.split.kind={kind}")
    rows = torch.cat([dm.rows[s] for s in ("train", "val", "test")])
    assert torch.equal(rows.sort().values, torch.arange(len(dm.data.interactions)))
    if kind == "random":
        assert len(dm.rows["test"]) == round(0.1 * len(rows))
        return
    inter = dm.data.interactions
    # every test row of a user is at least as late as every train row of that user
    latest_train = torch.zeros(dm.spec.num_users, dtype=torch.long).scatter_reduce(
        0, inter.users[dm.rows["train"]], inter.timestamps[dm.rows["train"]], "amax"
    )
    test_rows = dm.rows["test"]
    assert (inter.timestamps[test_rows] >= latest_train[inter.users[test_rows]]).all()
    if kind == "leave_one_out":
        assert len(test_rows) == len(inter.users[test_rows].unique()) == dm.spec.num_users


def test_leave_one_out_random_validation_rows(make_cfg):
    """val_row=random (He et al. 2017): the test row is each user's latest, the validation row
    one of the others, uniformly, the same one for the same seed."""
    dm = _datamodule(
        make_cfg, "data.variant=100k", "data.split.kind=leave_one_out", "data.split.val_row=random"
    )
    inter, rows = dm.data.interactions, dm.rows
    previous = _datamodule(make_cfg, "data.variant=100k", "data.split.kind=leave_one_out").rows
    assert torch.equal(rows["test"], previous["test"])
    assert len(rows["val"]) == len(inter.users[rows["val"]].unique()) == dm.spec.num_users
    # the validation row's rank in its user's rows from the latest (ties by row order, as the
    # split breaks them): 1 is the row before the test row
    order = np.lexsort((inter.timestamps.numpy(), inter.users.numpy()))
    users = inter.users.numpy()[order]
    counts = np.bincount(users)
    from_end = counts[users] - 1 - (np.arange(len(order)) - (np.cumsum(counts) - counts)[users])
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = from_end
    val_users = inter.users[rows["val"]].numpy()
    position = (rank[rows["val"].numpy()] - 1) / (counts[val_users] - 2)  # uniform on [0, 1]
    assert (rank[rows["val"].numpy()] >= 1).all() and len(np.unique(rank[rows["val"]])) > 100
    assert abs(position.mean() - 0.5) < 0.05 and abs((position < 0.25).mean() - 0.25) < 0.05
    again = _datamodule(
        make_cfg, "data.variant=100k", "data.split.kind=leave_one_out", "data.split.val_row=random"
    )
    assert torch.equal(again.rows["val"], rows["val"])


def test_checkpoints_from_before_val_row_name_the_same_data(make_cfg):
    dm = _datamodule(make_cfg, "data.variant=100k", "data.split.kind=leave_one_out")
    state = dm.state_dict()
    del state["settings"]["split"]["val_row"]  # as checkpoints written before it have it
    assert dm.settings_changes(state) == {}
    state["settings"]["split"]["val_row"] = "random"
    assert dm.settings_changes(state) == {"split.val_row": ("random", "previous")}


def test_an_option_added_later_at_its_empty_default_names_the_same_data():
    from recsys.data.identity import settings_changes

    saved = {"seed": 42, "user_features": {"dense": ["age"]}}
    empty = {"categorical": [], "multi_hot": None, "dense": []}
    assert settings_changes(saved, {**saved, "row_features": empty}) == {}
    assert settings_changes(saved, {**saved, "row_features": None}) == {}
    changed = {**saved, "row_features": {**empty, "dense": ["price"]}}
    assert settings_changes(saved, changed) == {"row_features.dense": ("<unset>", ["price"])}
    assert settings_changes(saved, {**saved, "seed": 7}) == {"seed": (42, 7)}


def test_temporal_split_needs_timestamps(make_cfg, cache_dir):
    from recsys.data.split import split_indices
    from recsys.data.store import Interactions

    inter = Interactions(
        *(torch.zeros(3, dtype=torch.long) for _ in range(4)), timestamps=torch.full((3,), -1)
    )
    with pytest.raises(ValueError, match="needs timestamps"):
        split_indices(inter, "temporal", 0.1, 0.1, seed=0)


def test_batches_are_gathered_whole(make_cfg):
    dm = _datamodule(make_cfg, "data.variant=100k", "data.batch_size=256")
    loader = dm.train_dataloader()
    assert loader.batch_size is None  # no per-sample collate
    batch = next(iter(loader))
    assert len(batch) == 256 and batch.dense_features.shape == (256, 2)
    kjt = batch.sparse_features
    assert kjt.keys() == dm.spec.sparse_names and kjt.stride() == 256
    # the batch equals the rows it was gathered from
    sampler = BatchIndexSampler(dm.rows["train"], 256, shuffle=True, seed=dm.seed)
    rows = next(iter(sampler)).rows
    inter = dm.data.interactions
    assert torch.equal(batch.ids("user_id"), inter.users[rows])
    assert torch.equal(batch.ids("item_id"), inter.items[rows])
    assert torch.equal(batch.labels, inter.labels[rows])


def test_sampler_epochs_differ_and_cover_rows():
    rows = torch.arange(1000)
    sampler = BatchIndexSampler(rows, 64, shuffle=True, seed=1)
    first = torch.cat([b.rows for b in sampler])
    sampler.set_epoch(1)
    second = torch.cat([b.rows for b in sampler])
    assert not torch.equal(first, second)
    assert torch.equal(first.sort().values, rows) and len(sampler) == 16


def test_ragged_gather_matches_python():
    offsets = torch.tensor([0, 2, 2, 5, 6])
    values = torch.tensor([10, 11, 20, 21, 22, 30])
    lengths, out = ragged_gather(offsets, values, torch.tensor([2, 1, 0, 2, 3]))
    assert lengths.tolist() == [3, 0, 2, 3, 1]
    assert out.tolist() == [20, 21, 22, 10, 11, 20, 21, 22, 30]


def test_missing_files_error_names_folder_and_files(make_cfg, tmp_path, monkeypatch):
    empty = tmp_path / "nothing-here"
    cfg = make_cfg("data=movielens", f"paths.data_dir={empty}", "data.download=false")
    with pytest.raises(FileNotFoundError) as err:
        instantiate(cfg.data).prepare_data()
    msg = str(err.value)
    assert str(empty / "ml-100k") in msg and "u.data" in msg and "u.user" in msg
    assert "RECSYS_DATA_DIR" in msg

    # with download on and no network (a closed local port), the error says that too
    monkeypatch.setattr(movielens, "GROUPLENS", "http://127.0.0.1:9")
    cfg = make_cfg("data=movielens", f"paths.data_dir={empty}", "data.download=true")
    with pytest.raises(FileNotFoundError, match="Downloading http://127.0.0.1:9/ml-100k.zip"):
        instantiate(cfg.data).prepare_data()


def test_download_checks_md5_and_extracts(tmp_path):
    archive = tmp_path / "src" / "ml-test.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-test/u.data", "1\t2\t3\t4\n")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="checksum mismatch"):
        download_and_extract(archive.as_uri(), "0" * 32, tmp_path / "bad")
    assert not list((tmp_path / "bad").glob("*.part"))
    download_and_extract(archive.as_uri(), md5, tmp_path / "good")
    assert (tmp_path / "good" / "ml-test" / "u.data").read_text() == "1\t2\t3\t4\n"


def test_same_size_edit_of_a_raw_file_rebuilds_the_cache(make_cfg, data_dir, tmp_path):
    """The processed-data cache is keyed by the raw files' content, not their sizes."""
    raw = tmp_path / "raw"
    (raw / "ml-100k").mkdir(parents=True)
    for name in movielens.FILES["100k"]:
        (raw / "ml-100k" / name).write_bytes((data_dir / "ml-100k" / name).read_bytes())
    cache = tmp_path / "cache"
    overrides = ("data.variant=100k", f"paths.data_dir={raw}", f"paths.cache_dir={cache}")
    before = _datamodule(make_cfg, *overrides)

    # the first row's rating 3 becomes 5: same size, different content (and label)
    u_data = raw / "ml-100k" / "u.data"
    lines = u_data.read_text().splitlines(keepends=True)
    user, item, rating, ts = lines[0].split("\t")
    assert rating == "3"
    lines[0] = "\t".join([user, item, "5", ts])
    edited = "".join(lines)
    assert len(edited) == u_data.stat().st_size
    u_data.write_text(edited)

    after = _datamodule(make_cfg, *overrides)
    assert after.processed_dir != before.processed_dir
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == sorted(
        [before.processed_dir.name, after.processed_dir.name]
    )
    first = (after.data.interactions.ratings[0], after.data.interactions.labels[0])
    assert first == (5.0, 1.0)
    assert before.data.interactions.labels[0] == 0.0


def test_cold_start_rows_are_counted_and_can_be_dropped(make_cfg, data_dir):
    """Test rows whose user or item has no training row are counted (and on request left
    out), checked against an independent count with pandas."""
    raw = pd.read_csv(data_dir / "ml-100k" / "u.data", sep="\t", header=None, names=list("uirt"))
    dm = _datamodule(make_cfg, "data.variant=100k")
    codes = dm.data.interactions
    train = raw.iloc[dm.rows["train"].numpy()]
    test = raw.iloc[dm.rows["test"].numpy()]
    cold_users = int((~test.u.isin(train.u)).sum())
    cold_items = int((~test.i.isin(train.i)).sum())
    assert cold_items > 0  # ml-100k has items rated once: a random split leaves some cold
    assert dm.cold_rows["test"] == {"cold_user_rows": cold_users, "cold_item_rows": cold_items}
    assert len(codes) == len(raw)

    kept = _datamodule(make_cfg, "data.variant=100k", "data.drop_cold_start=true")
    warm = test[test.u.isin(train.u) & test.i.isin(train.i)]
    assert (
        len(kept.rows["test"])
        == len(warm)
        == len(test) - kept.cold_rows["test"]["cold_rows_dropped"]
    )
    assert torch.equal(kept.rows["train"], dm.rows["train"])
