"""End-to-end training through `recsys.train.run` on the real config."""

from __future__ import annotations

import json

import pytest
import torch

from recsys.train import run


@pytest.mark.parametrize("data", ["movielens", "synthetic"])
def test_fast_dev_run(make_cfg, tmp_path, data):
    metrics = run(make_cfg(f"data={data}", "debug=fdr"))
    for name in (
        "train/loss",
        "val/loss",
        "val/auroc",
        "test/auroc",
        "test/logloss",
        "test/accuracy",
    ):
        assert name in metrics and metrics[name] == metrics[name], name  # present, not NaN
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["test/auroc"] == pytest.approx(metrics["test/auroc"])


def test_neumf_beats_popularity_on_ml100k(make_cfg, tmp_path):
    cfg = make_cfg(
        "data=movielens", "data.variant=100k", "model=ncf", "trainer.max_epochs=4", "logger=csv"
    )
    metrics = run(cfg)
    print(
        f"ml-100k NeuMF test AUROC {metrics['test/auroc']:.4f}, "
        f"popularity {metrics['popularity/test/auroc']:.4f}"
    )
    assert metrics["test/auroc"] > metrics["popularity/test/auroc"] + 0.05
    assert metrics["train/samples_per_sec"] > 0
    assert metrics["best_model_path"].endswith(".ckpt")
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "csv" / "metrics.csv").is_file()


def test_neumf_learns_synthetic_structure(make_cfg):
    metrics = run(
        make_cfg("data=synthetic", "model=ncf", "trainer.max_epochs=3", "model.optimizer.lr=0.005")
    )
    print(
        f"synthetic NeuMF test AUROC {metrics['test/auroc']:.4f}, "
        f"popularity {metrics['popularity/test/auroc']:.4f}"
    )
    assert metrics["test/auroc"] > metrics["popularity/test/auroc"]


def test_resume_from_last_checkpoint(make_cfg, tmp_path):
    first = tmp_path / "first"
    run(make_cfg("data=synthetic", "trainer.max_epochs=1", output_dir=first))
    last = first / "checkpoints" / "last.ckpt"
    assert last.is_file()
    step_after_one = torch.load(last, weights_only=False)["global_step"]

    second = tmp_path / "second"
    run(make_cfg("data=synthetic", "trainer.max_epochs=2", f"ckpt_path={last}", output_dir=second))
    resumed = torch.load(second / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["epoch"] == 1
    assert resumed["global_step"] == 2 * step_after_one


@pytest.mark.parametrize("variant", ["gmf", "mlp", "neumf"])
def test_ncf_variants_train(make_cfg, variant):
    metrics = run(make_cfg("data=synthetic", "debug=fdr", f"model.variant={variant}"))
    assert 0.0 <= metrics["test/auroc"] <= 1.0
