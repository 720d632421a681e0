"""End-to-end training through `recsys.train.run` on the real config."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import recsys.train
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
        "test/cold_user_rows",
        "test/cold_item_rows",
    ):
        assert name in metrics and metrics[name] == metrics[name], name  # present, not NaN
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["test/auroc"] == pytest.approx(metrics["test/auroc"])
    # no best checkpoint: the figures are the last validation's, and say so
    assert written["last_epoch"] == 0 and "best_epoch" not in written


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


def test_reports_the_validation_of_the_best_checkpoint(make_cfg, tmp_path, monkeypatch):
    """metrics.json and the value a sweeper gets are the figures of the checkpoint tested (the
    best by the monitor), not those of the last epoch."""
    import train  # the entry point: what main returns is what a Hydra sweeper optimises

    trainers = []
    build = recsys.train.build

    def spy(cfg):
        dm, model, trainer = build(cfg)
        trainers.append(trainer)
        return dm, model, trainer

    monkeypatch.setattr(recsys.train, "build", spy)
    # a high learning rate: the validation AUROC peaks early, then overfits
    cfg = make_cfg(
        "data=movielens",
        "data.variant=100k",
        "trainer.max_epochs=4",
        "model.optimizer.lr=0.05",
        "callbacks.early_stopping.patience=10",
        "logger=csv",
    )
    returned = train.main(cfg)

    written = json.loads((tmp_path / "metrics.json").read_text())
    history = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    val = history.dropna(subset=["val/auroc"]).set_index("epoch")
    assert list(val.index) == [0, 1, 2, 3]
    best_score = float(trainers[0].checkpoint_callback.best_model_score)
    assert val["val/auroc"].max() == pytest.approx(best_score)
    assert abs(val["val/auroc"].iloc[-1] - best_score) > 1e-3  # the last epoch is not the best

    assert written["val/auroc"] == pytest.approx(best_score)
    epoch = written["best_epoch"]
    for name in ("val/auroc", "val/loss", "val/accuracy"):  # all of that validation
        assert written[name] == pytest.approx(val.loc[epoch, name]), name
    train_rows = history.dropna(subset=["train/loss"]).set_index("epoch")
    assert written["train/loss"] == pytest.approx(train_rows.loc[epoch, "train/loss"])
    best = torch.load(written["best_model_path"], weights_only=False)
    assert (best["epoch"], best["global_step"]) == (epoch, written["best_step"])
    assert cfg.optimized_metric == "val/auroc" and returned == written["val/auroc"]


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
    # the validation history travels in the checkpoint: the resumed run knows epoch 0 too
    validations = resumed["callbacks"]["ValidationHistory"]["validations"]
    assert [v["epoch"] for v in validations] == [0, 1]
    assert resumed["epoch"] == 1
    assert resumed["global_step"] == 2 * step_after_one


@pytest.mark.parametrize("variant", ["gmf", "mlp", "neumf"])
def test_ncf_variants_beat_popularity_on_ml100k(make_cfg, variant):
    metrics = run(
        make_cfg(
            "data=movielens",
            "data.variant=100k",
            "trainer.max_epochs=2",
            f"model.variant={variant}",
        )
    )
    print(f"ml-100k {variant} test AUROC {metrics['test/auroc']:.4f}")
    assert metrics["test/auroc"] > metrics["popularity/test/auroc"] + 0.05


@pytest.mark.parametrize("model", ["hybrid", "dlrm"])
def test_other_models_beat_popularity_on_ml100k(make_cfg, model):
    metrics = run(
        make_cfg("data=movielens", "data.variant=100k", "trainer.max_epochs=2", f"model={model}")
    )
    print(f"ml-100k {model} test AUROC {metrics['test/auroc']:.4f}")
    assert metrics["test/auroc"] > metrics["popularity/test/auroc"] + 0.05


def test_train_loss_is_the_epochs_mean_by_sample(make_cfg, tmp_path):
    """``train/loss`` is the mean over the epoch's samples of the loss (logged once, on the
    epoch's last step); ``train/loss_step`` is each step's, here logged at every step. The
    last batch is smaller, so an unweighted mean of the steps would differ."""
    cfg = make_cfg(
        "data=movielens",
        "data.variant=100k",
        "data.batch_size=30000",  # 80,000 training rows: batches of 30,000, 30,000, 20,000
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        "logger=csv",
    )
    run(cfg)
    log = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    steps = log.dropna(subset=["train/loss_step"])["train/loss_step"].to_numpy()
    epoch = log.dropna(subset=["train/loss"])["train/loss"].to_numpy()
    sizes = [30_000, 30_000, 20_000]
    assert len(steps) == 3 and len(epoch) == 1
    assert epoch[0] == pytest.approx(float((steps * sizes).sum() / sum(sizes)), rel=1e-5)
    assert epoch[0] != pytest.approx(float(steps.mean()), rel=1e-5)
