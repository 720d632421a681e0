"""Exact resume: a run killed mid-epoch and resumed from last.ckpt ends where the uninterrupted
run ends, bitwise (what SLURM requeue and preemptible clusters rely on)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 20  # ml-100k: 80,000 training rows in batches of 4,000
KILL_AT_STEP = 27  # in the second epoch; the last checkpoint before it is at step 24


class KillAtStep(L.Callback):
    """Kills its own process with SIGKILL when training reaches ``step`` (no clean-up runs)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveFinalWeights(L.Callback):
    """Writes the weights at the end of training to ``path``."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), self.path)


def _train(data_dir, cache_dir, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "train.py",
        "data=movielens",
        "data.variant=100k",
        "data.batch_size=4000",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
        "logger=none",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "callbacks.early_stopping=null",
        "callbacks.last_checkpoint.every_n_train_steps=4",
        f"+callbacks.final._target_={__name__}.SaveFinalWeights",
        f"+callbacks.final.path={run_dir / 'final.pt'}",
        f"paths.data_dir={data_dir}",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize(
    "feedback",
    [
        # explicit labels, with dropout: the global RNG is part of the state
        ["data.feedback=explicit", "model.dropout=0.2"],
        # implicit feedback: every batch draws its negatives
        ["data.feedback=implicit", "data.num_negatives=2"],
    ],
    ids=["explicit", "implicit"],
)
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(
    data_dir, cache_dir, tmp_path, feedback
):
    whole = _train(data_dir, cache_dir, tmp_path / "whole", *feedback)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = _train(
        data_dir,
        cache_dir,
        tmp_path / "killed",
        *feedback,
        f"+callbacks.kill._target_={__name__}.KillAtStep",
        f"+callbacks.kill.step={KILL_AT_STEP}",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 24 and state["epoch"] == 1  # mid-epoch, after 4 batches
    assert not (tmp_path / "killed" / "final.pt").exists()

    resumed = _train(data_dir, cache_dir, tmp_path / "resumed", *feedback, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr

    expected = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    got = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    metrics = [
        json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("whole", "resumed")
    ]
    tested = [k for k in metrics[0] if k.startswith("test/") and "per_sec" not in k]
    assert tested and {k: metrics[0][k] for k in tested} == {k: metrics[1][k] for k in tested}


def test_loader_state_resumes_the_epoch_where_it_stopped(make_cfg):
    """The training loader's state after k batches makes a fresh loader yield exactly the
    batches (rows and negatives) that the first would have yielded next."""
    cfg = make_cfg(
        "data=movielens", "data.variant=100k", "data.feedback=implicit", "data.batch_size=8192"
    )
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(3)
    batches = iter(loader)
    for _ in range(4):
        next(batches)
    state = loader.state_dict()
    assert state == {"epoch": 3, "batches": 4}
    rest = list(batches)

    fresh = dm.train_dataloader()
    fresh.load_state_dict(state)
    again = list(fresh)
    assert len(again) == len(rest) == len(loader) - 4
    for a, b in zip(rest, again, strict=True):
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert torch.equal(a.labels, b.labels)
    assert fresh.state_dict() == {"epoch": 3, "batches": len(loader)}
