"""The command lines as a user meets them: --help, and mistakes in what they are asked to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "evaluate.py", "predict.py")


def command(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_the_config_groups_a_user_picks():
    out = command("train.py", "--help")
    assert out.returncode == 0, out.stderr
    assert "data: books, csv, movielens, synthetic" in out.stdout
    assert "logger: csv, mlflow, none, wandb" in out.stdout
    assert "_common" not in out.stdout and "data_common" not in out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_entry_points_load_no_torch_before_hydra_parses(script):
    """--help answers without importing Lightning or torch (they took about 11 s)."""
    code = (
        "import runpy, sys; "
        f"runpy.run_path({script!r}, run_name='entry'); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning'}))"
    )
    out = command("-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
