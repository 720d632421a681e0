"""Shared fixtures: the real config composed with test overrides, and the real data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# a process the tests start (DDP's spawned ranks, torchrun, the server's workers) that
# crashes prints its Python stack, as pytest's faulthandler does for the test process
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder holding ml-100k/, ml-1m/, book-crossing/ (env RECSYS_DATA_DIR).

    Missing data is a failure, not a skip: the tests are about real files.
    """
    value = os.environ.get("RECSYS_DATA_DIR")
    if not value or not (Path(value) / "ml-100k" / "u.data").is_file():
        pytest.fail(
            f"RECSYS_DATA_DIR={value!r} does not hold ml-100k/u.data: point it at the folder "
            "with the datasets (.ci/run uses ../shared/data)"
        )
    return Path(value)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One processed-data cache for the whole session: each dataset is preprocessed once."""
    return tmp_path_factory.mktemp("cache")


def compose_cfg(name: str, data_dir, cache_dir, output_dir, *overrides: str) -> DictConfig:
    """Compose ``conf/<name>.yaml`` with the test's data, cache and output folders."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(
            name,
            overrides=[
                f"paths.data_dir={data_dir}",
                f"paths.cache_dir={cache_dir}",
                f"paths.output_dir={output_dir}",
                *overrides,
            ],
        )


def compose_train(data_dir, cache_dir, output_dir, *overrides: str) -> DictConfig:
    """``conf/train.yaml`` shrunk for tests: CPU, no logger, no progress bar or summary."""
    cfg = compose_cfg(
        "train",
        data_dir,
        cache_dir,
        output_dir,
        "trainer.accelerator=cpu",
        "logger=none",
        *overrides,
    )
    with open_dict(cfg):
        for name in ("progress_bar", "model_summary"):
            cfg.callbacks.pop(name, None)
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
    return cfg


@pytest.fixture
def make_cfg(data_dir, cache_dir, tmp_path):
    """`compose_train` with this test's folder as the output folder by default."""

    def _make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        return compose_train(data_dir, cache_dir, output_dir or tmp_path, *overrides)

    return _make
