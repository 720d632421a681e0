"""What a run prints: one results table, no library messages a user cannot act on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping

from recsys.console import format_value, results_table, stop_reason

ROOT = Path(__file__).resolve().parents[1]

# lines that Lightning, torch and TorchRec print and a user can do nothing about
NOISE = (
    "GPU available",
    "TPU available",
    "litlogger",
    "Skipping setting a default",
    "is_fx_tracing",
    "LeafSpec",
    "Seed set to",
    "Test metric",  # Lightning's per-call test tables: the results are printed once, by us
    "FLOPs",
    "val_metrics",  # the metric modules in the model summary
    "Successfully loaded",  # fbgemm_gpu's libraries, on the root logger
)


def test_results_table_compares_with_the_baseline():
    metrics = {
        "test/auroc": 0.78,
        "popularity/test/auroc": 0.61,
        "test/cold_item_rows": 17,
        "val/auroc": 0.79,
    }
    lines = results_table(metrics).splitlines()
    assert lines[0].split() == ["metric", "model", "popularity", "difference"]
    auroc = next(line for line in lines if line.startswith("test/auroc")).split()
    assert auroc == ["test/auroc", "0.7800", "0.6100", "+0.1700"]
    cold = next(line for line in lines if line.startswith("test/cold_item_rows")).split()
    assert cold == ["test/cold_item_rows", "17"]  # a count, and no baseline to compare
    assert not any(line.startswith("val/") for line in lines)  # test figures only


def test_results_table_without_a_baseline_has_no_baseline_columns():
    lines = results_table({"test/auroc": 0.7591, "test/logloss": 0.47}).splitlines()
    assert lines[0].split() == ["metric", "model"]
    assert lines[2].split() == ["test/auroc", "0.7591"]


def test_counts_print_as_integers():
    assert format_value("test/cold_user_rows", 3.0) == "3"
    assert format_value("best_epoch", 12) == "12"
    assert format_value("train/samples_per_sec", 92819.42) == "92,819"
    assert format_value("test/auroc", 0.787499) == "0.7875"


def test_stop_reason_names_early_stopping():
    stopper = EarlyStopping(monitor="val/auroc", mode="max", patience=3)
    trainer = L.Trainer(callbacks=[stopper], max_epochs=20, logger=False, accelerator="cpu")
    assert stop_reason(trainer) == "trainer.max_epochs=20 reached"
    stopper.stopped_epoch = 9
    assert stop_reason(trainer) == "val/auroc did not improve for 3 validations"


def test_main_job_prints_one_results_table_and_no_library_noise(data_dir, cache_dir, tmp_path):
    """The Quick start's command as a user runs it (DLRM, which brings TorchRec's messages,
    a few batches): the console after the data report is the model summary and one table."""
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "model=dlrm",
            "trainer.max_epochs=2",
            "+trainer.limit_train_batches=3",
            "+trainer.limit_val_batches=2",
            "trainer.accelerator=cpu",
            "callbacks.progress_bar.refresh_rate=0",
            f"paths.data_dir={data_dir}",
            f"paths.cache_dir={cache_dir}",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-3000:]
    assert [n for n in NOISE if n in console] == []
    assert console.count("metric ") == 1  # the one results table's header
    assert "DLRM on ml-100k, random split, explicit feedback, pointwise" in console
    assert "training stopped: trainer.max_epochs=2 reached" in console
    run_dir = next(tmp_path.glob("train/runs/*"))
    assert f"run folder: {run_dir}" in console
