"""Memory at scale: the compact processed format and loading, the split indices, the pair sets
built on demand, and (slow) the scale benchmark command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from recsys import bench
from recsys.data import SyntheticDataModule
from recsys.data.negatives import PositiveSet
from recsys.data.preprocess import latest_of_pairs
from recsys.data.spec import FeatureSpec
from recsys.data.split import split_indices
from recsys.data.store import Interactions, read_interactions


@pytest.fixture
def synthetic(tmp_path) -> SyntheticDataModule:
    dm = SyntheticDataModule(
        num_users=300, num_items=200, num_rows=20_000, cache_dir=str(tmp_path), seed=3
    )
    dm.prepare_data()
    dm.setup()
    return dm


def test_processed_codes_are_int32_on_disk_and_int64_in_memory(synthetic):
    schema = pq.read_schema(synthetic.processed_dir / "interactions.parquet")
    assert {f.name: str(f.type) for f in schema} == {
        "user": "int32",
        "item": "int32",
        "label": "float",
        "rating": "float",
        "timestamp": "int64",
    }
    inter = synthetic.data.interactions
    dtypes = [inter.users.dtype, inter.items.dtype, inter.labels.dtype]
    assert dtypes == [torch.int64, torch.int64, torch.float32]
    assert [inter.ratings.dtype, inter.timestamps.dtype] == [torch.float32, torch.int64]


def test_read_interactions_round_trip_across_batches(tmp_path):
    rng = np.random.default_rng(0)
    n = 1000
    frame = pd.DataFrame(
        {
            "user": rng.integers(0, 50, n).astype(np.int32),
            "item": rng.integers(0, 70, n).astype(np.int32),
            "label": rng.integers(0, 2, n).astype(np.float32),
            "rating": np.where(rng.random(n) < 0.3, np.nan, rng.random(n) * 5).astype(np.float32),
            "timestamp": rng.integers(-1, 2**40, n),
        }
    )
    path = tmp_path / "interactions.parquet"
    frame.to_parquet(path, index=False, row_group_size=300)
    spec = FeatureSpec.of_ids(50, 70)
    inter = read_interactions(path, spec, batch_rows=128)  # batches that straddle row groups
    tensors = [inter.users, inter.items, inter.labels, inter.ratings, inter.timestamps]
    for name, tensor in zip(frame.columns, tensors, strict=True):
        np.testing.assert_array_equal(tensor.numpy(), frame[name].to_numpy(), err_msg=name)
    assert torch.isnan(inter.ratings).sum() == frame["rating"].isna().sum()
    assert inter.users.is_contiguous() and inter.users.numpy().flags.writeable


def test_latest_of_pairs_keeps_the_latest_row_of_each_pair():
    rng = np.random.default_rng(1)
    n = 5000
    users, items = rng.integers(0, 30, n), rng.integers(0, 20, n)
    timestamps = rng.integers(0, 4, n)  # many ties: the later row wins
    keep = latest_of_pairs(users, items, 20, timestamps)
    frame = pd.DataFrame({"user": users, "item": items, "timestamp": timestamps})
    latest = frame.sort_values("timestamp", kind="stable").duplicated(["user", "item"], "last")
    np.testing.assert_array_equal(keep, ~latest.sort_index().to_numpy())


def test_random_split_is_the_seeded_permutation_as_int32_rows():
    n = 1001
    inter = Interactions(*(torch.zeros(n, dtype=torch.long) for _ in range(5)))
    rows = split_indices(inter, "random", val=0.1, test=0.2, seed=5)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    n_test, n_val = round(n * 0.2), round(n * 0.1)
    expected = {
        "test": perm[:n_test],
        "val": perm[n_test : n_test + n_val],
        "train": perm[n_test + n_val :],
    }
    for name, indices in expected.items():
        assert rows[name].dtype == torch.int32
        assert torch.equal(rows[name].long(), indices.sort().values)


def test_pair_sets_are_built_once_when_asked_for(synthetic):
    dm = synthetic
    inter, num_items = dm.data.interactions, dm.spec.num_items
    assert dm.train_positives is dm.train_positives
    train = dm.rows["train"]
    expected = PositiveSet(inter.users[train], inter.items[train], num_items)
    assert torch.equal(dm.train_positives.keys, expected.keys)
    assert dm.positives is dm.positives is dm.protocol.positives
    assert torch.equal(dm.positives.keys, PositiveSet(inter.users, inter.items, num_items).keys)
    unset = SyntheticDataModule(cache_dir=str(dm.cache_dir))
    assert unset.positives is None and unset.train_positives is None


@pytest.mark.slow
def test_the_scale_command_runs(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"
    out = tmp_path / "scale.png"
    done = subprocess.run(
        [sys.executable, str(script), "quick=true", f"out={out}", f"results={tmp_path}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert "| rows | kept rows | users | items | stage | peak RSS MB | B/row |" in done.stdout
    lines = done.stdout.splitlines()
    for rows in ("100,000", "1,000,000"):
        for stage in ("preprocessing", "NeuMF", "DLRM"):
            assert any(ln.startswith(f"| {rows} |") and f"| {stage} |" in ln for ln in lines)
    assert "B per added row" in done.stdout
    assert out.is_file() and out.stat().st_size > 10_000
    rows = bench.read_results(tmp_path / "scale.json")["rows"]
    for stage in ("preprocessing", "NeuMF", "DLRM"):
        peak = bench.find(rows, model=stage, metric="peak_mb", rows=1_000_000)
        assert peak["unit"] == "MB" and f"| {peak['value']:,.0f} |" in done.stdout
