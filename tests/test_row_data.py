"""Data without user and item ids (click logs) and data with row features after training:
evaluate.py measures it pointwise; predict.py, serving and catalogue scoring refuse it with
a message that says why."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys import evaluate, predict
from recsys import serve as serving
from recsys.data.criteo_synthetic import generate_criteo
from recsys.data.spec import FeatureSpec, SparseFeature
from recsys.data.store import FeatureStore
from recsys.errors import InputError
from recsys.models import LogisticRegression
from recsys.recommender import Recommender
from recsys.scoring import CatalogueScorer
from recsys.train import run as train
from tests.conftest import compose_cfg, compose_train

NO_IDS = "no user or item ids"


@pytest.fixture(scope="module")
def criteo_ckpt(tmp_path_factory, cache_dir):
    """model=logreg trained one epoch on 20K generated Criteo rows."""
    data = tmp_path_factory.mktemp("criteo-data")
    generate_criteo(data, 20_000, seed=0)
    out = tmp_path_factory.mktemp("train")
    metrics = train(
        compose_train(
            data,
            cache_dir,
            out,
            "data=criteo",
            "model=logreg",
            "data.max_ind_range=5000",
            "data.batch_size=1024",
            "trainer.max_epochs=1",
        )
    )
    return data, metrics


@pytest.fixture(scope="module")
def row_feature_ckpt(tmp_path_factory, cache_dir):
    """model=dlrm on a CSV whose rows carry a feature of their own."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("csv")
    df = pd.DataFrame(
        {
            "user_id": rng.integers(0, 50, 1500),
            "item_id": rng.integers(0, 30, 1500),
            "label": rng.integers(0, 2, 1500),
            "device": rng.choice(["mobile", "desktop"], 1500),
        }
    ).drop_duplicates(["user_id", "item_id"])
    df.to_csv(folder / "events.csv", index=False)
    out = tmp_path_factory.mktemp("train")
    metrics = train(
        compose_train(
            folder,
            cache_dir,
            out,
            "data=csv",
            f"data.path={folder / 'events.csv'}",
            "data.row_features={categorical:[device]}",
            "model=dlrm",
            "trainer.max_epochs=1",
        )
    )
    return folder, metrics


def test_evaluate_measures_a_click_log_pointwise(criteo_ckpt, cache_dir, tmp_path):
    data, train_metrics = criteo_ckpt
    cfg = compose_cfg(
        "evaluate",
        data,
        cache_dir,
        tmp_path,
        f"ckpt_path={train_metrics['best_model_path']}",
        "trainer.accelerator=cpu",
    )
    metrics = evaluate.run(cfg)
    assert metrics["test/auroc"] == pytest.approx(train_metrics["test/auroc"], abs=1e-5)
    assert metrics["test/auroc"] > 0.55
    assert "test/latency_p50_ms" not in metrics  # no request is served from a click log


@pytest.mark.parametrize("which", ["criteo", "row features"])
def test_predict_and_serve_refuse_data_they_cannot_score(
    which, criteo_ckpt, row_feature_ckpt, cache_dir, tmp_path
):
    data, metrics = criteo_ckpt if which == "criteo" else row_feature_ckpt
    why = NO_IDS if which == "criteo" else r"row features \['device'\]"
    ckpt = f"ckpt_path={metrics['best_model_path']}"
    cfg = compose_cfg("predict", data, cache_dir, tmp_path, ckpt, f"output={tmp_path}/p.csv")
    with pytest.raises(InputError, match=rf"predict.py .*{why}"):
        predict.run(cfg)
    cfg = compose_cfg("serve", data, cache_dir, tmp_path, ckpt)
    with pytest.raises(InputError, match=rf"serve .*{why}.*not .*served"):
        serving.app_from_config(cfg)
    with pytest.raises(InputError, match=rf"serve .*{why}"):  # before any worker starts
        serving.run(cfg)
    with pytest.raises(InputError, match=why):
        Recommender.from_config(cfg)


def test_catalogue_scoring_refuses_data_without_ids():
    spec = FeatureSpec.of_rows((SparseFeature("C1", "row", 4),))
    with pytest.raises(InputError, match=NO_IDS):
        CatalogueScorer(LogisticRegression(spec), FeatureStore(spec, None, None), 0)
