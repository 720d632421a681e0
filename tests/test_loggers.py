"""The experiment loggers end to end: train.py with logger=mlflow, wandb and csv on a short
ml-100k run, and what each logged run holds (the model's figures and the popularity
baseline's)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recsys.train import run

ROOT = Path(__file__).resolve().parents[1]


def train_script(tmp_path: Path, data_dir, cache_dir, *overrides: str, env: dict | None = None):
    """``python train.py`` on ml-100k for a few batches of one epoch, its run folder
    ``tmp_path/run`` and logs below ``tmp_path/logs``; returns the finished process."""
    return subprocess.run(
        [
            sys.executable,
            "train.py",
            "debug=limit",
            "trainer.max_epochs=1",
            "trainer.accelerator=cpu",
            f"paths.data_dir={data_dir}",
            f"paths.cache_dir={cache_dir}",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"hydra.run.dir={tmp_path / 'run'}",
            *overrides,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def finished(out: subprocess.CompletedProcess, run_dir: Path) -> dict:
    """The run's ``metrics.json``, once the run has exited 0."""
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_mlflow_logs_the_model_and_the_baseline_as_nested_runs(data_dir, cache_dir, tmp_path):
    """The baseline's test used to re-log the param ``net`` into the model's run: MLflow
    refused ("Changing param values is not allowed") and the run exited 1 without
    metrics.json."""
    from mlflow import MlflowClient

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = train_script(tmp_path, data_dir, cache_dir, "logger=mlflow", env=env)
    metrics = finished(out, tmp_path / "run")

    client = MlflowClient(f"sqlite:///{tmp_path / 'logs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("recsys")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"run", "popularity"}  # the model's run: the run folder's name
    model, baseline = runs["run"], runs["popularity"]
    assert model.data.tags["run_dir"] == str(tmp_path / "run")
    assert baseline.data.tags["mlflow.parentRunId"] == model.info.run_id
    assert "mlflow.parentRunId" not in model.data.tags
    assert model.data.params["net"] == "recsys.models.NeuMF"
    assert baseline.data.params["net"] == "recsys.models.Popularity"
    for name in ("test/auroc", "test/logloss", "test/accuracy"):
        assert model.data.metrics[name] == pytest.approx(metrics[name]), name
        assert baseline.data.metrics[name] == pytest.approx(metrics[f"popularity/{name}"]), name
    assert model.data.metrics["val/auroc"] == pytest.approx(metrics["val/auroc"])
    assert not [k for k in model.data.metrics if k.startswith("popularity/")]
    assert {model.info.status, baseline.info.status} == {"FINISHED"}


def wandb_records(run_dir: Path):
    """The records of the offline W&B run in ``run_dir`` (``wandb/offline-run-*/run-*.wandb``):
    W&B's 7-byte header, then LevelDB's log format (32 KiB blocks of chunks, each with a
    7-byte header: CRC, length, type full/first/middle/last) around ``Record`` protobufs. wandb
    itself has no reader for them since 0.2x (its sync is in the Go core)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block, pos, record = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        record += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            message = wandb_internal_pb2.Record()
            message.ParseFromString(record)
            record = b""
            yield message


@pytest.mark.slow
def test_wandb_offline_run_holds_the_models_config_and_both_test_results(
    data_dir, cache_dir, tmp_path
):
    """The baseline's hyperparameters used to overwrite the model's in the W&B config (net:
    recsys.models.Popularity, and every other setting back to its default)."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[name] = str(tmp_path / "wandb-home")
    out = train_script(tmp_path, data_dir, cache_dir, "logger=wandb", env=env)
    metrics = finished(out, tmp_path / "run")

    def key(item) -> str:  # "test/auroc" comes as nested_key ["test/auroc"]
        return item.key or "/".join(item.nested_key)

    config, logged = {}, {}
    for record in wandb_records(tmp_path / "run"):
        kind = record.WhichOneof("record_type")
        updates = {"run": record.run.config.update, "config": record.config.update}.get(kind, [])
        config.update({key(item): json.loads(item.value_json) for item in updates})
        if kind == "history":
            logged.update({key(i): json.loads(i.value_json) for i in record.history.item})
    assert config["net"] == "recsys.models.NeuMF"
    assert config["model"]["net"] == "recsys.models.NeuMF"
    for name in ("test/auroc", "popularity/test/auroc", "popularity/test/logloss"):
        assert logged[name] == pytest.approx(metrics[name]), name


@pytest.mark.slow
def test_csv_hparams_stay_the_models(make_cfg, tmp_path):
    """The baseline's test used to rewrite csv/hparams.yaml with its own hyperparameters."""
    metrics = run(make_cfg("logger=csv", "debug=limit", "trainer.max_epochs=1"))
    hparams = yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text())
    assert hparams["net"] == "recsys.models.NeuMF"
    assert hparams["model"]["net"] == "recsys.models.NeuMF"
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"test/auroc", "popularity/test/auroc"} <= set(header)
    assert "popularity/test/auroc" in metrics
