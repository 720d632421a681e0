"""evaluate.py and predict.py on a checkpoint written by a real training run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from recsys import evaluate, predict
from recsys.runs import QUERIES_FILE, ROWS_FILE, read_test_results
from recsys.train import run as train
from tests.conftest import compose_cfg, compose_train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, cache_dir):
    """A short implicit-feedback NeuMF run on ml-100k with leave-one-out ranking."""
    out = tmp_path_factory.mktemp("train")
    cfg = compose_train(
        data_dir,
        cache_dir,
        out,
        "data.feedback=implicit",
        "data.split.kind=leave_one_out",
        "data.ranking=sampled",
        "trainer.max_epochs=1",
    )
    metrics = train(cfg)
    return metrics, metrics["best_model_path"]


def test_evaluate_reproduces_training_test_metrics(trained, data_dir, cache_dir, tmp_path):
    train_metrics, ckpt = trained
    cfg = compose_cfg(
        "evaluate",
        data_dir,
        cache_dir,
        tmp_path,
        f"ckpt_path={ckpt}",
        "trainer.accelerator=cpu",
        "+trainer.enable_progress_bar=false",
    )
    metrics = evaluate.run(cfg)
    for name in (
        "test/auroc",
        "test/logloss",
        "test/hr@10",
        "test/ndcg@10",
        "test/mrr",
        "popularity/test/hr@10",
    ):
        assert metrics[name] == pytest.approx(train_metrics[name], abs=1e-6), name
    assert json.loads((tmp_path / "metrics.json").read_text())["test/hr@10"] == pytest.approx(
        train_metrics["test/hr@10"]
    )


def test_evaluate_full_ranking_adds_list_metrics(trained, data_dir, cache_dir, tmp_path):
    cfg = compose_cfg(
        "evaluate",
        data_dir,
        cache_dir,
        tmp_path,
        f"ckpt_path={trained[1]}",
        "data.ranking=full",
        "trainer.accelerator=cpu",
        "+trainer.enable_progress_bar=false",
    )
    metrics = evaluate.run(cfg)
    assert 0 < metrics["test/coverage@10"] <= 1 and metrics["test/novelty@10"] > 0
    p50, p99 = metrics["test/latency_p50_ms"], metrics["test/latency_p99_ms"]
    assert 0 < p50 <= p99 and metrics["test/peak_memory_mb"] > 0
    assert "popularity/test/coverage@10" in metrics


def test_predict_excludes_seen_items(trained, data_dir, cache_dir, tmp_path):
    out = tmp_path / "recs.parquet"
    cfg = compose_cfg(
        "predict", data_dir, cache_dir, tmp_path, f"ckpt_path={trained[1]}", "k=7", f"output={out}"
    )
    assert predict.run(cfg)["rows"] > 0
    recs = pd.read_parquet(out)
    ratings = pd.read_csv(
        data_dir / "ml-100k" / "u.data",
        sep="\t",
        header=None,
        names=["user", "item", "rating", "ts"],
    ).astype(str)
    seen = set(zip(ratings.user, ratings.item, strict=True))
    assert not any(p in seen for p in zip(recs.user_id, recs.item_id, strict=True))
    assert recs.groupby("user_id").size().eq(7).all()
    assert recs.user_id.nunique() == ratings.user.nunique()
    assert recs.title.str.len().gt(0).all() and (recs.source == "model").all()


def test_predict_unknown_ids(trained, data_dir, cache_dir, tmp_path):
    base = [f"ckpt_path={trained[1]}", "k=3"]
    with pytest.raises(ValueError, match=r"unknown user ids \['424242'\].*fallback=popular"):
        predict.run(
            compose_cfg("predict", data_dir, cache_dir, tmp_path, *base, "user_ids=[1,424242]")
        )
    cfg = compose_cfg(
        "predict", data_dir, cache_dir, tmp_path, *base, "user_ids=[1,424242]", "fallback=popular"
    )
    recs = pd.read_csv(predict.run(cfg)["output"], dtype={"user_id": str, "item_id": str})
    assert (recs[recs.user_id == "424242"].source == "popular").all()
    assert (recs[recs.user_id == "1"].source == "model").all()
    with pytest.raises(ValueError, match="similar_to='no-such-item' is not an item id"):
        predict.run(
            compose_cfg("predict", data_dir, cache_dir, tmp_path, *base, "similar_to=no-such-item")
        )


def test_predict_similar_items(trained, data_dir, cache_dir, tmp_path):
    cfg = compose_cfg(
        "predict", data_dir, cache_dir, tmp_path, f"ckpt_path={trained[1]}", "similar_to=1", "k=5"
    )
    recs = pd.read_csv(predict.run(cfg)["output"], dtype={"item_id": str})
    assert len(recs) == 5 and "1" not in set(recs.item_id)
    assert recs.similarity.is_monotonic_decreasing


def test_the_test_figures_per_query_and_per_row_average_to_the_reported_ones(trained):
    """test_queries.parquet and test_rows.parquet hold each query's and row's figures: their
    means are the reported metrics, the rows' AUROC is test/auroc, each user once."""
    metrics, ckpt = trained
    run = Path(ckpt).parents[1]
    queries, about = read_test_results(run / QUERIES_FILE)
    assert about["protocol"]["ranking"] == "sampled" and about["checkpoint"] == ckpt
    assert queries["user"].is_unique  # leave-one-out: one held-out item a user
    for name in ("hr@10", "ndcg@10", "recall@5", "mrr"):
        assert queries[name].mean() == pytest.approx(metrics[f"test/{name}"], abs=1e-6), name
    assert ((queries["rank"] <= 10) == (queries["hr@10"] == 1)).all()
    rows, _ = read_test_results(run / ROWS_FILE)
    auroc = binary_auroc(torch.tensor(rows["logit"].values), torch.tensor(rows["label"].values))
    assert float(auroc) == pytest.approx(metrics["test/auroc"], abs=1e-6)
    assert rows["user_id"].notna().all() and (rows["label"] == 1).sum() == len(queries)
