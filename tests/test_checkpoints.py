"""Checkpoints stand on their own: evaluate and predict from a checkpoint and its processed
folder (raw files gone), one read of the file, and data other than the checkpoint's refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from recsys import evaluate, predict
from recsys.checkpoint import latest_run
from recsys.data import MovieLensDataModule
from recsys.data.artifact import ArtifactDataModule
from recsys.data.movielens import FILES
from recsys.runs import data_from_checkpoint
from recsys.train import run as train
from tests.conftest import compose_cfg, compose_train

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("test/auroc", "test/logloss", "test/accuracy", "popularity/test/auroc")


def _copy_ml100k(src, dst):
    (dst / "ml-100k").mkdir(parents=True)
    for name in FILES["100k"]:
        shutil.copyfile(src / "ml-100k" / name, dst / "ml-100k" / name)
    return dst


@pytest.fixture(scope="module")
def run_without_raw(tmp_path_factory, data_dir):
    """Train on a copy of ml-100k with its own cache, then delete the copy: only the
    checkpoint and the processed folder remain."""
    root = tmp_path_factory.mktemp("standalone")
    raw = _copy_ml100k(data_dir, root / "raw")
    cache, out = root / "cache", root / "train"
    metrics = train(compose_train(raw, cache, out, "trainer.max_epochs=1"))
    shutil.rmtree(raw)
    return {"raw": raw, "cache": cache, "out": out, "metrics": metrics}


def _evaluate(run, tmp_path, *overrides, data_dir=None, checkpoint=None):
    cfg = compose_cfg(
        "evaluate",
        data_dir or run["raw"],
        run["cache"],
        tmp_path,
        checkpoint or f"ckpt_path={run['metrics']['best_model_path']}",
        "trainer.accelerator=cpu",
        "+trainer.enable_progress_bar=false",
        *overrides,
    )
    return evaluate.run(cfg)


def test_checkpoint_carries_data_hyperparameters_and_processed_folder(run_without_raw):
    ckpt = torch.load(run_without_raw["metrics"]["best_model_path"], weights_only=True)
    assert "data_config" not in ckpt
    hparams = ckpt["datamodule_hyper_parameters"]
    assert hparams["variant"] == "100k" and hparams["seed"] == 42
    state = ckpt["MovieLensDataModule"]
    assert state["data_class"] == "recsys.data.movielens.MovieLensDataModule"
    assert (run_without_raw["cache"] / state["processed"] / "meta.json").is_file()
    # Lightning's own loader rebuilds the module from the same file
    dm = MovieLensDataModule.load_from_checkpoint(
        run_without_raw["metrics"]["best_model_path"], weights_only=True
    )
    assert dm.hparams.split == {"kind": "random", "val": 0.1, "test": 0.1, "val_row": "previous"}


def test_evaluate_without_raw_files_reproduces_training(run_without_raw, tmp_path, monkeypatch):
    assert not run_without_raw["raw"].exists()
    reads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a) or load(*a, **k))
    metrics = _evaluate(run_without_raw, tmp_path)
    assert len(reads) == 1  # the checkpoint file is read once
    for name in COMPARED:
        assert metrics[name] == run_without_raw["metrics"][name], name


def test_evaluate_reads_the_processed_folder_not_the_datasets_module(run_without_raw, tmp_path):
    """The checkpoint's processed folder is the whole data of evaluation: its split rows are
    saved in it, and the dataset's module (``data_class``) is never imported or built."""
    ckpt = torch.load(run_without_raw["metrics"]["best_model_path"], weights_only=True)
    state = ckpt["MovieLensDataModule"]
    state["data_class"] = "recsys.data.gone.GoneDataModule"  # an import of it would fail
    path = tmp_path / "moved.ckpt"
    torch.save(ckpt, path)
    dm = data_from_checkpoint(ckpt, {"cache_dir": str(run_without_raw["cache"])})
    assert type(dm) is ArtifactDataModule
    dm.prepare_data()
    dm.setup("test")
    (split_file,) = (run_without_raw["cache"] / state["processed"]).glob("split-*.npz")
    assert dm.split_path == split_file and dm.source == "ml-100k"
    assert sum(len(r) for r in dm.rows.values()) == len(dm.data.interactions) == 100_000
    metrics = _evaluate(run_without_raw, tmp_path, checkpoint=f"ckpt_path={path}")
    for name in COMPARED:
        assert metrics[name] == run_without_raw["metrics"][name], name


def test_evaluate_run_dir_tests_the_runs_best_checkpoint(run_without_raw, tmp_path):
    """``run_dir=`` evaluates the checkpoint the run's metrics.json was measured on."""
    metrics = _evaluate(run_without_raw, tmp_path, checkpoint=f"run_dir={run_without_raw['out']}")
    assert metrics["ckpt_path"] == run_without_raw["metrics"]["best_model_path"]
    for name in COMPARED:
        assert metrics[name] == run_without_raw["metrics"][name], name


def test_predict_without_raw_files(run_without_raw, tmp_path):
    out = tmp_path / "recs.csv"
    cfg = compose_cfg(
        "predict",
        run_without_raw["raw"],
        run_without_raw["cache"],
        tmp_path,
        f"ckpt_path={run_without_raw['metrics']['best_model_path']}",
        "user_ids=[1,2]",
        "k=4",
        f"output={out}",
    )
    assert predict.run(cfg)["rows"] == 8
    assert pd.read_csv(out).title.str.len().gt(0).all()
    # run_dir= predicts from the checkpoint the run tested, as evaluate does
    cfg.ckpt_path, cfg.run_dir = None, str(run_without_raw["out"])
    assert predict.run(cfg)["ckpt_path"] == run_without_raw["metrics"]["best_model_path"]


def test_evaluate_with_other_data_is_refused_or_explicitly_allowed(
    run_without_raw, data_dir, tmp_path
):
    with pytest.raises(ValueError, match=r"data\.seed: 42 -> 7.*allow_new_data=true"):
        _evaluate(run_without_raw, tmp_path, "+data.seed=7")
    # paths, loader settings and the evaluation protocol are not the data: allowed
    metrics = _evaluate(run_without_raw, tmp_path, "data.eval_batch_size=1000")
    assert metrics["test/auroc"] == pytest.approx(run_without_raw["metrics"]["test/auroc"])
    # new data on purpose: built from the raw files this run points at
    allowed = _evaluate(
        run_without_raw, tmp_path, "+data.seed=7", "allow_new_data=true", data_dir=data_dir
    )
    assert allowed["test/auroc"] != run_without_raw["metrics"]["test/auroc"]


def test_resume_with_other_data_is_refused(run_without_raw, data_dir, cache_dir, tmp_path):
    last = run_without_raw["out"] / "checkpoints" / "last.ckpt"
    cfg = compose_train(
        data_dir, cache_dir, tmp_path, "trainer.max_epochs=2", f"ckpt_path={last}", "data.seed=7"
    )
    with pytest.raises(ValueError, match=r"data\.seed: 42 -> 7.*data\.seed=42"):
        train(cfg)


def test_resume_with_other_raw_files_is_refused(run_without_raw, data_dir, tmp_path):
    """Same settings, an edited raw file: other processed data."""
    raw = _copy_ml100k(data_dir, tmp_path / "raw")
    u_data = raw / "ml-100k" / "u.data"
    u_data.write_text(u_data.read_text().replace("\t3\t", "\t5\t", 1))  # a rating 3 -> 5
    last = run_without_raw["out"] / "checkpoints" / "last.ckpt"
    cfg = compose_train(
        raw, tmp_path / "cache", tmp_path / "out", "trainer.max_epochs=2", f"ckpt_path={last}"
    )
    with pytest.raises(ValueError, match=r"processed data: ml-100k-\w+ -> ml-100k-\w+"):
        train(cfg)


@pytest.mark.slow
def test_sharded_checkpoint_predicts_and_evaluates_without_raw_files(data_dir, tmp_path):
    """A trainer=torchrec checkpoint folder: its shards gathered into one model (predict.py,
    evaluate.py with a one-process trainer) score as the sharded model did."""
    raw, cache, out = _copy_ml100k(data_dir, tmp_path / "raw"), tmp_path / "cache", tmp_path / "t"
    done = subprocess.run(
        [
            sys.executable,
            "train.py",
            "trainer=torchrec",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            "model=dlrm",
            "trainer.max_epochs=1",
            "logger=none",
            f"paths.data_dir={raw}",
            f"paths.cache_dir={cache}",
            f"hydra.run.dir={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trained = json.loads((out / "metrics.json").read_text())
    assert (Path(trained["best_model_path"]) / "meta.pt").is_file()
    shutil.rmtree(raw)
    run = {"raw": raw, "cache": cache, "metrics": trained}

    metrics = _evaluate(run, tmp_path / "eval")
    assert metrics["test/auroc"] == pytest.approx(trained["test/auroc"], abs=1e-6)
    cfg = compose_cfg(
        "predict", raw, cache, tmp_path, f"ckpt_path={trained['best_model_path']}", "k=3"
    )
    assert predict.run(cfg)["rows"] == 3 * 943


def test_latest_run_passes_over_crashed_and_fast_dev_runs(tmp_path):
    runs = tmp_path / "train" / "runs"
    finished = runs / "2026-01-01_10-00-00"
    crashed = runs / "2026-01-01_11-00-00"  # no metrics.json
    debug = runs / "2026-01-01_12-00-00"  # fast_dev_run: no best checkpoint
    for folder in (finished, crashed, debug):
        folder.mkdir(parents=True)
    (finished / "metrics.json").write_text(json.dumps({"best_model_path": "x.ckpt"}))
    (debug / "metrics.json").write_text(json.dumps({"best_model_path": ""}))
    assert latest_run(runs) == finished
    with pytest.raises(ValueError, match="no finished training run"):
        latest_run(tmp_path / "elsewhere")
