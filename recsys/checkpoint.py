"""Checkpoints back into a model and its data: what evaluate, predict and serving share."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import lightning as L
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from recsys.data.artifact import ArtifactDataModule
from recsys.data.base import RecDataModule
from recsys.data.identity import (
    DataMismatchError,
    data_settings,
    describe_changes,
    merge_settings,
    settings_changes,
)
from recsys.distributed.torchrec_strategy import load_meta, load_shards, load_weights_only
from recsys.errors import InputError, MissingInputError
from recsys.lit.module import RecommenderModule

log = logging.getLogger(__name__)


def load_checkpoint(
    cfg: DictConfig, unshard: bool = True
) -> tuple[ArtifactDataModule, RecommenderModule]:
    """The model of ``cfg.ckpt_path`` and its data module (prepared and set up).

    The checkpoint is read once, with ``weights_only=True`` (one from elsewhere never runs code
    here). A sharded checkpoint folder (trainer=torchrec) is read through its ``meta.pt``; with
    ``unshard`` its shards load into one plain model, else the weights are left to the strategy
    (``trainer.test(ckpt_path=...)`` puts each shard on its rank).

    The data is the processed folder that the checkpoint names in ``paths.cache_dir``, read
    with the checkpoint's data hyperparameters and the changes in ``cfg.data`` (keys set to
    null keep the checkpoint's value): the raw files are not needed. Changes of the data
    settings are refused unless ``cfg.allow_new_data`` (`data_from_checkpoint`).
    """
    path = Path(cfg.ckpt_path)
    if path.is_dir():  # a sharded checkpoint of trainer.strategy=torchrec
        checkpoint = load_meta(path)
    elif path.is_file():
        checkpoint = load_weights_only(path)
    else:
        raise MissingInputError(f"ckpt_path={path} does not exist; pass a training checkpoint")
    overrides = {"data_dir": str(cfg.paths.data_dir), "cache_dir": str(cfg.paths.cache_dir)}
    data = cfg.get("data")
    changes = OmegaConf.to_container(data, resolve=True) if data is not None else {}
    overrides.update({k: v for k, v in changes.items() if v is not None})
    try:
        dm = data_from_checkpoint(
            checkpoint, overrides, allow_new_data=cfg.get("allow_new_data", False)
        )
    except DataMismatchError as e:
        raise DataMismatchError(f"{path}: {e}") from None
    dm.prepare_data()
    dm.setup("test")
    model = RecommenderModule(**checkpoint["hyper_parameters"])
    if path.is_dir() and unshard:
        state = {"state_dict": model.state_dict()}
        load_shards(state, path)  # every shard into the plain (unsharded) tables
        model.load_state_dict(state["state_dict"])
    elif path.is_file():
        model.load_state_dict(checkpoint["state_dict"])
    if model.spec != dm.spec:
        raise InputError(
            f"the data ({dm.source}: {dm.spec.num_users} users, {dm.spec.num_items} items) "
            f"differs from the data {path} was trained on ({model.spec.num_users} users, "
            f"{model.spec.num_items} items): its embeddings do not fit these users and items"
        )
    # the statistics of this data's training split (older checkpoints do not carry them)
    model.set_item_statistics(**dm.protocol.item_statistics())
    return dm, model


def checkpoint_from_config(cfg) -> str:
    """The checkpoint a command works on: ``ckpt_path`` when given, else the best checkpoint
    of ``run_dir`` (`best_checkpoint`: the one its test metrics were measured on; ``latest``:
    `latest_run`)."""
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    if cfg.get("run_dir"):
        return str(best_checkpoint(run_dir_from_config(cfg)))
    raise InputError("pass run_dir=<training run folder> (or latest) or ckpt_path=<checkpoint>")


def run_dir_from_config(cfg) -> Path:
    """``cfg.run_dir`` as a folder: ``latest`` is `latest_run` under ``paths.log_dir``."""
    if cfg.run_dir == "latest":
        return latest_run(Path(cfg.paths.log_dir) / "train" / "runs")
    return Path(cfg.run_dir)


def latest_run(runs: Path) -> Path:
    """The newest run folder in ``runs`` whose ``metrics.json`` names a best checkpoint: runs
    that crashed or are still training (no metrics.json) and fast_dev_run runs are passed
    over."""
    finished = [
        m.parent
        for m in sorted(runs.glob("*/metrics.json"))
        if json.loads(m.read_text()).get("best_model_path")
    ]
    if not finished:
        raise InputError(
            f"run_dir=latest: no finished training run in {runs} (a folder with a metrics.json "
            "that names a best checkpoint): train one, or pass run_dir=<folder>"
        )
    return finished[-1]


def best_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint named in the run's ``metrics.json``; looked up in the run's own
    ``checkpoints/`` when the run folder has been moved since training."""
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise InputError(
            f"run_dir={run_dir} holds no metrics.json: pass the folder of a finished "
            "training run, or ckpt_path=<checkpoint>"
        )
    best = json.loads(metrics_file.read_text()).get("best_model_path")
    if not best:
        raise InputError(
            f"{metrics_file} names no best checkpoint (fast_dev_run or callbacks=none): "
            f"pass ckpt_path={run_dir}/checkpoints/last.ckpt or another checkpoint"
        )
    path = Path(best)
    if not path.exists():
        path = run_dir / "checkpoints" / path.name
    if not path.exists():
        raise InputError(
            f"the best checkpoint {best} of {metrics_file} is gone (nor in {path.parent}): "
            "pass ckpt_path=<checkpoint>"
        )
    return path


def run_folder(ckpt_path: Path) -> Path | None:
    """The training run folder of a checkpoint (the first folder above it that holds
    ``metrics.json`` or ``csv/metrics.csv``), or None for a checkpoint outside a run."""
    for folder in list(ckpt_path.resolve().parents)[:3]:
        if (folder / "metrics.json").is_file() or (folder / "csv" / "metrics.csv").is_file():
            return folder
    return None


def data_from_checkpoint(
    checkpoint: dict, overrides: dict | None = None, allow_new_data: bool = False
) -> ArtifactDataModule:
    """The data a checkpoint was trained with: its processed folder (`ArtifactDataModule`),
    read without the raw files or the dataset's module.

    ``overrides`` (this run's paths, loader settings, evaluation protocol) replace saved
    hyperparameters. Overrides that change the data settings raise `DataMismatchError`, unless
    ``allow_new_data``: the dataset's module (the checkpoint's ``data_class``) is then built as
    for training, from the files the overrides point at. It is built too, pinned to the
    checkpoint's folder, when that folder is not in ``cache_dir``: it rebuilds the folder from
    raw files that give the same one, and refuses others. Call `prepare_data` and `setup` next.
    """
    hparams = checkpoint.get(L.LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY)
    state = next(
        (v for v in checkpoint.values() if isinstance(v, Mapping) and "data_class" in v), None
    )
    if hparams is None or state is None:
        raise InputError(
            "the checkpoint holds no data module (datamodule_hyper_parameters and its "
            "state): it was written by an older recsys or not by train.py; train it again"
        )
    settings = merge_settings(hparams, overrides or {})
    changes = settings_changes(state.get("settings", {}), data_settings(settings))
    if changes and not allow_new_data:
        raise DataMismatchError(
            f"the checkpoint was trained on other data than this config asks for: "
            f"{describe_changes(changes)}. Drop these overrides to evaluate it on its own "
            f"data (processed folder {state['processed']} in paths.cache_dir), or pass "
            "allow_new_data=true to score it on this data anyway."
        )
    if not allow_new_data:
        try:
            return ArtifactDataModule.open(state["processed"], settings)
        except MissingInputError:
            pass  # not in cache_dir: the dataset's module rebuilds it from the raw files
    cls = get_class(state["data_class"])
    if not (isinstance(cls, type) and issubclass(cls, RecDataModule)):
        raise InputError(f"data_class {state['data_class']} is not a RecDataModule")
    dm = cls(**settings)
    if allow_new_data:
        dm.check_data = False
        log.warning(
            "allow_new_data=true: scoring the checkpoint on the data this config gives (%s), "
            "not on its own processed folder %s (%s); users and items are the codes of "
            "this data's own encoding",
            describe_changes(changes) if changes else "same data settings",
            state["processed"],
            "the raw files are read and preprocessed as for training",
        )
        return dm
    dm.use_processed(state["processed"])
    return dm
