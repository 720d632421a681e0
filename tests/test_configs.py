"""Every config group option composes and instantiates; every experiment runs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recsys.data.base import RecDataModule
from recsys.data.criteo_synthetic import generate_criteo
from recsys.runs import instantiate_group
from recsys.train import run
from tests.conftest import CONF_DIR


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_groups_exist():
    for group in (
        "data",
        "model",
        "trainer",
        "callbacks",
        "logger",
        "paths",
        "hydra",
        "experiment",
        "hparams_search",
        "debug",
    ):
        assert options(group), group


@pytest.mark.parametrize("name", options("data"))
def test_data_options(make_cfg, name, tmp_path):
    overrides = [f"data={name}"]
    if name == "csv":  # the csv option reads any file: give it one
        (tmp_path / "train.csv").write_text("userId,itemId,target\n1,10,1\n2,10,0\n2,11,1\n")
        overrides.append(f"data.path={tmp_path / 'train.csv'}")
    if name == "criteo":  # no Criteo files here: files in their layout from the generator
        generate_criteo(tmp_path, 2000, seed=0)
        overrides.append(f"paths.data_dir={tmp_path}")
    dm = instantiate(make_cfg(*overrides).data)
    assert isinstance(dm, RecDataModule)
    dm.prepare_data()
    assert dm.spec.sparse and (dm.spec.num_users > 0 or name == "criteo")


def test_shared_model_keys_have_one_home():
    """``conf/model_common.yaml`` holds the keys every model shares (hidden from --help, as
    ``conf/data_common.yaml`` is); a model sets one of them only to give it another value."""
    group = "model"
    common = OmegaConf.load(CONF_DIR / f"{group}_common.yaml")
    for name in options(group):
        own = OmegaConf.load(CONF_DIR / group / f"{name}.yaml")
        assert f"/{group}_common@_here_" in own.defaults, name
        repeated = [k for k in own if k in common and own[k] == common[k]]
        assert not repeated, f"conf/{group}/{name}.yaml repeats {repeated}"


@pytest.mark.parametrize("name", options("model"))
def test_model_options(make_cfg, name):
    cfg = make_cfg("data=synthetic", f"model={name}")
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    model = instantiate(cfg.model, spec=dm.spec.to_dict(), _recursive_=False)
    batch = next(iter(dm.train_dataloader()))
    logits = model(batch)
    assert logits.shape == (len(batch),) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options(make_cfg, name):
    if name == "gpu" and not torch.cuda.is_available():
        pytest.skip("no GPU on this machine")
    cfg = make_cfg(f"trainer={name}")
    if name != "gpu":
        cfg.trainer.accelerator = "cpu"
    assert isinstance(instantiate(cfg.trainer), L.Trainer)


@pytest.mark.parametrize("name", options("callbacks"))
def test_callbacks_options(make_cfg, name):
    for cb in instantiate_group(make_cfg(f"callbacks={name}").callbacks):
        assert isinstance(cb, L.Callback)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "val/auroc"),
        (["data.ranking=sampled"], "val/ndcg@10"),
        (["data.ranking=full"], "val/ndcg@10"),
        (["data.ranking=sampled", "monitor=val/hr@10"], "val/hr@10"),
    ],
)
def test_monitor_follows_the_evaluation_protocol(make_cfg, overrides, expected):
    """One `monitor` selects the best checkpoint, stops early and goes to the sweeper."""
    cfg = make_cfg(*overrides)
    assert cfg.callbacks.model_checkpoint.monitor == expected
    assert cfg.callbacks.early_stopping.monitor == expected
    assert cfg.optimized_metric == expected
    for name in ("model_checkpoint", "early_stopping"):
        callback = instantiate(cfg.callbacks[name])
        assert (callback.monitor, callback.mode) == (expected, "max"), name


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options(make_cfg, name, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = make_cfg(f"logger={name}", f"paths.log_dir={tmp_path}")
    for lg in instantiate_group(cfg.logger):
        assert isinstance(lg, L.pytorch.loggers.Logger)


@pytest.mark.parametrize("name", options("debug"))
def test_debug_options_run(make_cfg, name):
    # overfit_batches makes Lightning demand sequential samplers (it used to swap in a
    # per-sample one that crashed the whole-batch loaders)
    metrics = run(make_cfg("data.variant=100k", f"debug={name}", "trainer.max_epochs=2"))
    assert metrics["test/auroc"] == metrics["test/auroc"]  # reported, not NaN


@pytest.mark.parametrize("name", options("experiment"))
def test_experiments_run(make_cfg, name):
    # cluster experiments run here on one CPU process: what is tested is the rest of the file
    single = ["trainer.devices=1", "++trainer.num_nodes=1", "++trainer.strategy=auto"]
    metrics = run(make_cfg(f"experiment={name}", "debug=fdr", *single))
    assert "test/auroc" in metrics


def test_train_script_runs_from_the_command_line(data_dir, cache_dir, tmp_path):
    """The README command itself, as a user runs it (fast_dev_run to keep it short)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "data=synthetic",
            "debug=fdr",
            "logger=csv",
            f"paths.data_dir={data_dir}",
            f"paths.cache_dir={cache_dir}",
            f"paths.log_dir={tmp_path}",
            "trainer.accelerator=cpu",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/auroc" in out.stdout + out.stderr
    assert list(tmp_path.glob("train/runs/*/metrics.json"))
