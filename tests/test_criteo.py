"""Criteo click logs: the file format, DLRM's preprocessing, the generator with a known click
model, and ``data=criteo`` end to end on generated files (no Criteo data is on this machine)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from recsys.data.clicklog import (
    CRITEO_DENSE,
    CRITEO_SPARSE,
    VocabularyBuilder,
    read_chunks,
    split_bounds,
)
from recsys.data.criteo import CriteoDataModule
from recsys.data.criteo_synthetic import generate_criteo
from recsys.data.synthetic import main as synthetic_main
from recsys.errors import InputError
from recsys.train import run

LINES = [
    # label, I1..I13, C1..C26; empty fields are missing
    ["1", "5", "-3", "", *["0"] * 10, "68fd1e64", "", *["0a"] * 24],
    ["0", "", "0", "7", *["2"] * 10, "68fd1e64", "80e26c9b", *["ff"] * 24],
    ["0", "1", "1", "1", *["1"] * 10, "1", "80e26c9b", *[""] * 24],
]


def write_lines(path, lines, opener=open):
    with opener(path, "wt") as f:
        f.writelines("\t".join(line) + "\n" for line in lines)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_chunks_applies_dlrms_transform(tmp_path, suffix):
    path = tmp_path / f"train.txt{suffix}"
    write_lines(path, LINES, gzip.open if suffix else open)
    (chunk,) = read_chunks(path)
    assert chunk.label.tolist() == [1.0, 0.0, 0.0]
    # log(1 + max(x, 0)); a missing integer is 0
    assert chunk.dense[0, :3].tolist() == pytest.approx([np.log(6), 0.0, 0.0])
    assert chunk.dense[1, :3].tolist() == pytest.approx([0.0, 0.0, np.log(8)])
    # hex values as integers, -1 where missing
    assert chunk.sparse[:, 0].tolist() == [0x68FD1E64, 0x68FD1E64, 1]
    assert chunk.sparse[:, 1].tolist() == [-1, 0x80E26C9B, 0x80E26C9B]
    assert chunk.sparse[2, 2:].tolist() == [-1] * 24


def test_read_chunks_is_bounded_by_the_chunk_and_equals_one_read(tmp_path):
    generate_criteo(tmp_path, 1000, seed=3)
    path = tmp_path / "criteo" / "train.txt"
    whole = pd.read_csv(path, sep="\t", header=None, names=["label", *CRITEO_DENSE, *CRITEO_SPARSE])
    chunks = list(read_chunks(path, chunk_rows=300))
    assert [len(c) for c in chunks] == [300, 300, 300, 100]
    assert [c.start for c in chunks] == [0, 300, 600, 900]
    label = np.concatenate([c.label for c in chunks])
    dense = np.concatenate([c.dense for c in chunks])
    sparse = np.concatenate([c.sparse for c in chunks])
    assert np.array_equal(label, whole["label"].to_numpy(np.float32))
    ints = whole[CRITEO_DENSE].fillna(0).to_numpy()
    assert np.allclose(dense, np.log1p(np.maximum(ints, 0)), atol=1e-6)
    hexes = whole[CRITEO_SPARSE].fillna("").to_numpy()
    expected = np.vectorize(lambda h: int(h, 16) if h else -1)(hexes)
    assert np.array_equal(sparse, expected)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_chunks_holds_a_block_of_the_file_not_the_file(tmp_path, suffix):
    """Arrow's allocations while chunks are read stay near one block of lines (64 KB for
    200-row chunks), however large the file; a reader that reads ahead would hold the file."""
    generate_criteo(tmp_path, 40_000, seed=1, gzip=bool(suffix))  # about 9.7 MB of lines
    path = tmp_path / "criteo" / f"train.txt{suffix}"
    before = pa.total_allocated_bytes()  # what earlier tests' Arrow data holds
    peak, rows = 0, 0
    for chunk in read_chunks(path, chunk_rows=200):
        peak = max(peak, pa.total_allocated_bytes() - before)
        rows += len(chunk)
    assert rows == 40_000
    assert peak < 1_000_000, f"{peak:,} bytes held while reading 9.7 MB of lines"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (["2", *["1"] * 13, *["0a"] * 26], "column label"),
        (["1", "x", *["1"] * 12, *["0a"] * 26], "column I1: 'x' is not an integer"),
        (["1", *["1"] * 13, "zz", *["0a"] * 25], "column C1: 'zz'"),
        (["1", *["1"] * 13, *["0a"] * 25], "39 tab-separated fields, expected 40"),
    ],
)
def test_a_bad_line_is_named(tmp_path, line, problem):
    path = tmp_path / "train.txt"
    write_lines(path, [LINES[0], line])
    with pytest.raises(InputError, match=rf"train.txt, line 2: .*{problem}"):
        list(read_chunks(path))


def test_vocabulary_caps_hashes_and_drops_rare_values():
    sparse = np.array([[10, 3], [13, 3], [10, -1], [7, 4]])
    builder = VocabularyBuilder(max_ind_range=3, min_count=2, num_features=2)
    builder.update(sparse[:2])
    builder.update(sparse[2:])  # counts merge across chunks
    vocab = builder.build()
    # feature 0: 10 % 3 = 1 (x3: 10, 13, 10), 7 % 3 = 1: one value, four rows
    assert vocab.sizes == [2, 2] and vocab.counts[0].tolist() == [4]
    # feature 1: 3 % 3 = 0 twice keeps code 1; 4 % 3 = 1 once is rare: code 0, as missing
    assert vocab.encode(sparse).tolist() == [[1, 1], [1, 1], [1, 0], [1, 0]]


def test_split_bounds_follow_the_reference_implementations():
    # Kaggle: the last of 7 "days" (n // 7 rows) halved, the first half taking the odd row
    assert split_bounds([100], "kaggle") == {
        "train": (0, 86),
        "val": (86, 93),
        "test": (93, 100),
    }
    # 1TB: the last day halved
    assert split_bounds([10, 10, 5], "terabyte") == {
        "train": (0, 20),
        "val": (20, 23),
        "test": (23, 25),
    }


def test_generator_is_seeded_and_prints_its_oracle(tmp_path, capsys):
    a = generate_criteo(tmp_path / "a", 5000, seed=1)
    generate_criteo(tmp_path / "b", 5000, seed=1, layout="terabyte", days=4)
    first = (tmp_path / "a" / "criteo" / "train.txt").read_bytes()
    days = b"".join((tmp_path / "b" / "criteo" / f"day_{d}").read_bytes() for d in range(4))
    assert first == days  # the same rows, whatever the layout
    assert a["splits"]["test"]["rows"] == 5000 // 7 // 2
    synthetic_main(["format=criteo", "rows=5000", "seed=1", f"out={tmp_path / 'c'}"])
    out = capsys.readouterr().out
    oracle = json.loads((tmp_path / "c" / "criteo" / "oracle.json").read_text())
    assert f"oracle test: AUROC {oracle['splits']['test']['auroc']:.4f}" in out
    assert (tmp_path / "c" / "criteo" / "train.txt").read_bytes() == first


@pytest.fixture(scope="module")
def criteo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("criteo-data")
    generate_criteo(folder, 60_000, seed=0)
    return folder


def test_datamodule_codes_rows_in_file_order(criteo_dir, tmp_path):
    dm = CriteoDataModule(
        data_dir=criteo_dir, cache_dir=tmp_path, max_ind_range=1000, chunk_rows=7000
    )
    dm.prepare_data()
    dm.setup("fit")
    bounds = split_bounds([60_000], "kaggle")
    assert torch.equal(dm.rows["train"], torch.arange(*bounds["train"]))
    assert not dm.spec.has_ids
    assert [f.name for f in dm.spec.sparse] == CRITEO_SPARSE
    assert all(f.num_embeddings <= 1001 for f in dm.spec.sparse)
    # the first training row, coded independently from the file
    line = (criteo_dir / "criteo" / "train.txt").open().readline().rstrip("\n").split("\t")
    batch = dm.data.interactions.take(torch.arange(1)).batch(dm.data.features)
    ints = np.array([int(v) if v else 0 for v in line[1:14]])
    assert batch.dense_features[0].numpy() == pytest.approx(np.log1p(np.maximum(ints, 0)))
    assert batch.labels[0] == float(line[0])


@pytest.mark.parametrize("streaming", [False, True])
def test_dlrm_trains_on_criteo_and_nears_the_oracle(make_cfg, criteo_dir, streaming):
    oracle = json.loads((criteo_dir / "criteo" / "oracle.json").read_text())
    cfg = make_cfg(
        "data=criteo",
        "model=dlrm",
        f"paths.data_dir={criteo_dir}",
        "data.max_ind_range=20000",
        "data.batch_size=1024",
        f"data.streaming={streaming}",
        "data.block_rows=2048",
        "model.sparse_grad=true",
        "trainer.max_epochs=1",
    )
    metrics = run(cfg)
    best = oracle["splits"]["test"]["auroc"]
    print(
        f"criteo 60k rows, streaming={streaming}: test AUROC {metrics['test/auroc']:.4f}, "
        f"oracle {best:.4f}"
    )
    assert 0.62 < metrics["test/auroc"] < best


def test_logreg_trains_on_criteo(make_cfg, criteo_dir):
    oracle = json.loads((criteo_dir / "criteo" / "oracle.json").read_text())
    cfg = make_cfg(
        "data=criteo",
        "model=logreg",
        f"paths.data_dir={criteo_dir}",
        "data.max_ind_range=20000",
        "data.batch_size=1024",
        "model.sparse_grad=true",
        "trainer.max_epochs=1",
    )
    metrics = run(cfg)
    best = oracle["splits"]["test"]["auroc"]
    print(f"criteo 60k rows, logreg: test AUROC {metrics['test/auroc']:.4f}, oracle {best:.4f}")
    assert 0.6 < metrics["test/auroc"] < best


@pytest.mark.parametrize("model", ["ncf", "hybrid"])
def test_models_that_need_ids_refuse_criteo_before_loading_it(make_cfg, criteo_dir, model):
    cfg = make_cfg("data=criteo", f"model={model}", f"paths.data_dir={criteo_dir}")

    def setup(self, stage=None):
        raise AssertionError("the data was loaded before the model was refused")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CriteoDataModule, "setup", setup)
        with pytest.raises(Exception, match=rf"model={model} needs user and item ids") as info:
            run(cfg)
    cause = info.value if isinstance(info.value, InputError) else info.value.__cause__
    assert isinstance(cause, InputError)
