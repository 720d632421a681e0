"""Hydra multirun grids, the Optuna sweeper, the SLURM launcher config, run comparison."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

import recsys  # noqa: F401  (registers the resolvers conf/ uses)
from tests.conftest import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path, data_dir, cache_dir, *args: str) -> str:
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            *args,
            "data=synthetic",
            "debug=limit",
            "logger=csv",
            "trainer.accelerator=cpu",
            f"paths.data_dir={data_dir}",
            f"paths.cache_dir={cache_dir}",
            f"paths.log_dir={tmp_path}",
            "callbacks.progress_bar.refresh_rate=0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.slow
def test_grid_sweep_and_compare(tmp_path, data_dir, cache_dir):
    _train(tmp_path, data_dir, cache_dir, "-m", "model=ncf,hybrid", "data.batch_size=256,512")
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    runs = sorted(sweep.glob("*/metrics.json"))
    assert len(runs) == 4

    chart, output = tmp_path / "chart.png", tmp_path / "compare.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys.compare",
            f"runs=[{sweep}]",
            "metrics=[val/auroc,test/auroc]",
            f"chart={chart}",
            f"output={output}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    document = json.loads(output.read_text())
    assert len(document["runs"]) == 4 and sum(r["model"] == "hybrid" for r in document["runs"]) == 2
    assert {"data.batch_size", "val/auroc"} <= set(document["runs"][0])
    # every run against the first on the same test rows: DeLong's test of the AUROCs
    tested = [r for r in document["statistics"] if r["metric"] == "test/auroc" and r["p_value"]]
    assert len(tested) == 3 and all(r["test"] == "DeLong" for r in tested)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_optuna_sweep(tmp_path, data_dir, cache_dir):
    _train(
        tmp_path,
        data_dir,
        cache_dir,
        "hparams_search=ncf_optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=2",
    )
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    assert len(list(sweep.glob("*/metrics.json"))) == 3
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert 0 < best["best_value"] <= 1 and "model.optimizer.lr" in best["best_params"]


@pytest.mark.parametrize(("ranking", "expected"), [("null", "val/auroc"), ("full", "val/ndcg@10")])
def test_optuna_search_maximises_the_monitored_metric(ranking, expected):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hparams_search=ncf_optuna", f"data.ranking={ranking}"],
            return_hydra_config=True,
        )
    assert cfg.optimized_metric == cfg.callbacks.model_checkpoint.monitor == expected
    assert cfg.callbacks.model_checkpoint.mode == "max"
    assert cfg.hydra.sweeper.direction == "maximize"


def test_slurm_experiment_composes():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=slurm_2x8_dlrm"], return_hydra_config=True)
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 8
    assert cfg.trainer.strategy == "ddp"
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.nodes == 2 and launcher.tasks_per_node == 8 and launcher.gpus_per_node == 8


@pytest.mark.parametrize("path", ["nowhere"])
def test_compare_rejects_missing_folders(tmp_path, path):
    from recsys.compare import load_runs

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_runs([tmp_path / path])
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        load_runs([tmp_path])
