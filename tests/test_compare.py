"""recsys.compare on real runs: intervals and paired tests over the same users, refusal of
runs tested on other candidates, and the summary over seeds."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy import stats as sps

from recsys import compare
from recsys.errors import InputError
from recsys.runs import QUERIES_FILE, RESULTS_KEY, ROWS_FILE
from recsys.train import run as train
from tests.conftest import compose_cfg, compose_train

PROTOCOL = (
    "data.feedback=implicit",
    "data.split.kind=leave_one_out",
    "data.ranking=sampled",
    "trainer.max_epochs=1",
)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, data_dir, cache_dir):
    """EASE and a GMF on ml-100k's leave-one-out test, the same candidates."""
    root = tmp_path_factory.mktemp("compare")
    folders = []
    for name, model in (("ease", ["model=ease"]), ("gmf", ["model.variant=gmf"])):
        metrics = train(compose_train(data_dir, cache_dir, root / name, *model, *PROTOCOL))
        folders.append(str(root / name))
        assert metrics["best_model_path"].startswith(folders[-1])
    return root, folders


def _compare(root, runs, *overrides):
    cfg = compose_cfg(
        "compare", root, root, root / "out", f"runs=[{','.join(map(str, runs))}]", *overrides
    )
    return compare.run(cfg)


def _rows(document, metric):
    return [r for r in document["statistics"] if r["metric"] == metric]


def test_a_run_against_the_baseline_on_the_same_users(two_runs):
    root, (ease, gmf) = two_runs
    document = _compare(root, [ease, gmf], "resamples=2000")
    base, other = _rows(document, "test/hr@10")
    assert base["run"] == ease and other["run"] == gmf
    assert base["low"] < base["mean"] < base["high"]
    assert base["mean"] == pytest.approx(base["reported"])
    # the paired t-test over the same users, by scipy on the two files
    a = pd.read_parquet(f"{ease}/{QUERIES_FILE}").set_index(["user", "item"])["hr@10"]
    b = pd.read_parquet(f"{gmf}/{QUERIES_FILE}").set_index(["user", "item"])["hr@10"]
    assert other["p_value"] == pytest.approx(sps.ttest_rel(b, a.loc[b.index]).pvalue)
    assert other["difference"] == pytest.approx(b.mean() - a.mean())
    (auroc,) = [r for r in _rows(document, "test/auroc") if r["run"] == gmf]
    assert auroc["test"] == "DeLong" and auroc["difference"] == pytest.approx(
        auroc["reported"] - _rows(document, "test/auroc")[0]["reported"], abs=1e-6
    )
    saved = json.loads((root / "out" / "compare.json").read_text())
    assert saved["baseline"] == ease and (root / "out" / "compare.png").is_file()


def test_identical_runs_differ_by_nothing(two_runs, tmp_path):
    """The same run's files, their rows in another order (as other ranks write them)."""
    root, (ease, _) = two_runs
    copy = tmp_path / "copy"
    shutil.copytree(ease, copy)
    for name in (QUERIES_FILE, ROWS_FILE):
        table = pq.read_table(copy / name)
        order = np.random.default_rng(0).permutation(table.num_rows)
        pq.write_table(table.take(order), copy / name)
    document = _compare(root, [ease, copy], "resamples=500")
    for metric in ("test/hr@10", "test/ndcg@10", "test/auroc"):
        _, other = _rows(document, metric)
        assert other["difference"] == 0 and other["p_value"] == 1.0, metric


def test_runs_tested_on_other_candidates_are_not_paired(two_runs, tmp_path):
    root, (ease, gmf) = two_runs
    other = tmp_path / "other"
    shutil.copytree(gmf, other)
    path = other / QUERIES_FILE
    table = pq.read_table(path)
    about = json.loads(table.schema.metadata[RESULTS_KEY])
    about["protocol"]["candidates"] = "ranking-test-elsewhere.parquet"
    meta = {**table.schema.metadata, RESULTS_KEY: json.dumps(about)}
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(InputError, match="tested on other protocol.*unpaired=true"):
        _compare(root, [ease, other], "metrics=[test/hr@10]")
    document = _compare(root, [ease, other], "metrics=[test/hr@10]", "unpaired=true")
    assert _rows(document, "test/hr@10")[1]["test"].startswith("unpaired")


def test_runs_that_differ_in_their_seed_are_summarised_over_seeds(data_dir, cache_dir, tmp_path):
    folders = []
    for seed in (1, 2):
        out = tmp_path / f"seed{seed}"
        cfg = compose_train(data_dir, cache_dir, out, "model=ease", f"seed={seed}", *PROTOCOL)
        (out / ".hydra").mkdir(parents=True, exist_ok=True)
        (out / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n- model=ease\n")
        train(cfg)
        folders.append(out)
    document = _compare(tmp_path, folders, "resamples=200", "unpaired=true")
    (row,) = [r for r in document["over_seeds"] if r["metric"] == "test/hr@10"]
    values = [r["reported"] for r in _rows(document, "test/hr@10")]
    assert row["seeds"] == 2 and row["mean"] == pytest.approx(sum(values) / 2)
    assert row["low"] < row["mean"] < row["high"]
