"""What every command's run shares: the Trainer's callbacks and loggers from their config
groups, where the module is built under the Trainer's strategy, the report of a run's
metrics (``metrics.json`` and the printed table), and a checkpoint back into its model and
data (`load_checkpoint`: evaluate, predict, serving and the dashboard)."""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import lightning as L
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from hydra.utils import get_class, instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from recsys.checkpoint import (
    check_classes,
    data_state,
    lightning_checkpoint,
    load_meta,
    load_shards,
    load_weights_only,
)
from recsys.console import format_value, results_table
from recsys.data.artifact import ArtifactDataModule
from recsys.data.base import RecDataModule
from recsys.data.identity import (
    DataMismatchError,
    data_settings,
    describe_changes,
    merge_settings,
    settings_changes,
)
from recsys.distributed import TorchRecStrategy  # also registers trainer.strategy=torchrec
from recsys.errors import InputError, MissingInputError
from recsys.lit.module import RecommenderModule

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a config group that holds several objects (callbacks,
    loggers); entries set to null are skipped."""
    return [instantiate(c) for c in (cfg or {}).values() if c is not None]


def model_context(trainer: L.Trainer) -> AbstractContextManager:
    """Where the module is built: `TorchRecStrategy.model_sharded_context` under
    trainer=torchrec (embedding tables on the meta device, allocated shard by shard when the
    strategy shards them); the CPU, as usual, under every other strategy."""
    if isinstance(trainer.strategy, TorchRecStrategy):
        return trainer.strategy.model_sharded_context()
    return nullcontext()


@rank_zero_only
def report(metrics: dict, output_dir: Path, title: list[str]) -> None:
    """Write ``metrics.json`` into the run folder and print the results: ``title`` (what was
    run), the test figures against the popularity baseline (`results_table`), the validation
    and training figures, and where the files are."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    fit = [
        f"{k} {format_value(k, v)}"
        for k, v in sorted(metrics.items())
        if k.startswith(("val/", "train/")) and isinstance(v, int | float)
    ]
    lines = [*title, "", results_table(metrics)]
    if fit:
        lines += ["", "  ".join(fit)]
    lines.append(f"run folder: {output_dir} (metrics.json, checkpoints/, .hydra/config.yaml)")
    log.info("Results\n%s", "\n".join(lines))


# beside metrics.json: the test's figures per ranking query and per pointwise row
QUERIES_FILE, ROWS_FILE = "test_queries.parquet", "test_rows.parquet"
RESULTS_KEY = b"recsys"  # the files' metadata: what the figures were measured on


@rank_zero_only
def write_test_results(
    model: RecommenderModule, dm: ArtifactDataModule, output_dir: Path, ckpt_path: str | None
) -> list[Path]:
    """Write the last test's figures per ranking query (``test_queries.parquet``) and per
    pointwise row (``test_rows.parquet``, with the model's logit) into the run folder, raw
    ids beside the codes. Their metadata (`read_test_results`) names the processed data, the
    split and the evaluation protocol (candidates included) they were measured on, and the
    checkpoint: runs compare user by user only where these agree (`recsys.compare`)."""
    about = {
        "data": {"processed": dm.processed_dir.name, **dm.split_settings()},
        "protocol": dm.protocol.describe(),
        "checkpoint": ckpt_path,
    }
    written = []
    if not model.test_results:  # tested in other processes (ddp_spawn): they kept the figures
        log.warning(
            "no per-query or per-row test results in this process (the test ran in processes "
            "of trainer.strategy=ddp_spawn): %s and %s are not written; python evaluate.py "
            "run_dir=%s writes them",
            QUERIES_FILE,
            ROWS_FILE,
            output_dir,
        )
        return written
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in model.test_results.items():
        frame = frame.copy()
        if dm.spec.has_ids:
            for entity, raw in (("user", dm.data.user_ids), ("item", dm.data.item_ids)):
                codes = frame[entity].to_numpy()
                frame.insert(frame.columns.get_loc(entity) + 1, f"{entity}_id", None)
                known = codes >= 0
                frame.loc[known, f"{entity}_id"] = raw[codes[known]].astype(str)
        table = pa.Table.from_pandas(frame, preserve_index=False)
        meta = {**(table.schema.metadata or {}), RESULTS_KEY: json.dumps(about, default=str)}
        path = output_dir / (QUERIES_FILE if name == "queries" else ROWS_FILE)
        pq.write_table(table.replace_schema_metadata(meta), path)
        written.append(path)
    return written


def read_test_results(path: Path) -> tuple[pd.DataFrame, dict]:
    """A file of `write_test_results` and what it was measured on."""
    table = pq.read_table(path)
    about = json.loads((table.schema.metadata or {}).get(RESULTS_KEY, b"{}"))
    return table.to_pandas(), about


def load_checkpoint(
    cfg: DictConfig, unshard: bool = True
) -> tuple[ArtifactDataModule, RecommenderModule]:
    """The model of ``cfg.ckpt_path`` and its data module (prepared and set up).

    The checkpoint is read once, with ``weights_only=True``, and the classes it names are
    checked before any is imported (`check_classes`: the platform's own, or those of
    ``cfg.trusted_classes``), so one from elsewhere never runs code here. A sharded checkpoint
    folder (trainer=torchrec) is read through its ``meta.pt``; with ``unshard`` its shards load
    into one plain model, else the weights are left to the strategy (``trainer.test(ckpt_path=
    ...)`` puts each shard on its rank).

    The data is the processed folder that the checkpoint names in ``paths.cache_dir``, read
    with the checkpoint's data hyperparameters and the changes in ``cfg.data`` (keys set to
    null keep the checkpoint's value): the raw files are not needed. Changes of the data
    settings are refused unless ``cfg.allow_new_data`` (`data_from_checkpoint`).
    """
    path = Path(cfg.ckpt_path)
    if path.is_dir():  # a sharded checkpoint of trainer.strategy=torchrec
        checkpoint = lightning_checkpoint(load_meta(path), path, weights=False)
    elif path.is_file():
        checkpoint = lightning_checkpoint(load_weights_only(path), path)
    else:
        raise MissingInputError(f"ckpt_path={path} does not exist; pass a training checkpoint")
    check_classes(checkpoint, path, trusted=cfg.get("trusted_classes") or ())
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
    state = data_state(checkpoint)
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
