"""The core install, without the extras (`[serve]`, `[dashboard]`, `[mlflow]`, `[bench]`,
`[docs]`), trains, evaluates and predicts: each entry point runs in a process where the
extras' packages cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("fastapi", "uvicorn", "faiss", "streamlit", "mlflow", "aiohttp", "httpx", "mkdocs")
# runs a script as `python <script> <args>` would, with the extras' packages unimportable
WITHOUT_EXTRAS = f"""
import runpy, sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRAS!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (an extra)", name=name)

sys.meta_path.insert(0, Blocked())
sys.argv = sys.argv[1:]
if sys.argv[0] == "-m":  # python -m <module> <args>
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(script: str, *args: str, returncode: int = 0) -> str:
    target = ["-m", script] if not script.endswith(".py") else [str(ROOT / script)]
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRAS, *target, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == returncode, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.slow
def test_the_core_install_trains_evaluates_and_predicts(data_dir, cache_dir, tmp_path):
    paths = [f"paths.data_dir={data_dir}", f"paths.cache_dir={cache_dir}"]
    _run(
        "train.py",
        *paths,
        f"paths.log_dir={tmp_path / 'logs'}",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
    )
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    ckpt = json.loads((run / "metrics.json").read_text())["best_model_path"]
    _run("evaluate.py", *paths, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}")
    out = tmp_path / "recs.csv"
    _run("predict.py", *paths, f"ckpt_path={ckpt}", "user_ids=[1]", "k=3", f"output={out}")
    assert len(out.read_text().splitlines()) == 4


@pytest.mark.parametrize(
    ("module", "extra"), [("recsys.serve", "serve"), ("recsys.dashboard", "dashboard")]
)
def test_a_command_of_an_extra_says_which_extra_to_install(module, extra):
    out = _run(module, "ckpt_path=none.ckpt", returncode=1)
    assert f"needs the [{extra}] extra" in out and f"pip install -e '.[{extra}]'" in out
