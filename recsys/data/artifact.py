"""The processed dataset as one artifact: what evaluation, prediction, serving and the
dashboard load beside a model, without the raw files or the dataset's own module.

A processed folder ``<cache_dir>/<source>-<hash>`` describes itself: ``meta.json`` (the
settings it was built with, sizes, feature spec, cleaning report), the id maps and item
information (``users.parquet``, ``items.parquet``), the interactions, and per split setting
the split rows (``split-<hash>.npz``, `split_path`) or, streamed, the shards
(``shards-<hash>/``); the evaluation protocol keeps its sampled candidates beside them.
`ArtifactDataModule` opens such a folder; `recsys.data.base.RecDataModule` builds it from the
raw files and adds the training loaders.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from recsys.config import plain
from recsys.data.identity import (
    SPLIT_DEFAULTS,
    DataMismatchError,
    data_settings,
    describe_changes,
    restore_hint,
    settings_changes,
)
from recsys.data.negatives import PositiveSet
from recsys.data.preprocess import INTERACTIONS_FILE, META_FILE, cache_key
from recsys.data.protocol import EvaluationProtocol
from recsys.data.spec import FeatureSpec
from recsys.data.split import source_split, split_indices
from recsys.data.store import ProcessedDataset, read_columns, read_meta
from recsys.data.stream import (
    SHARDS_FILE,
    SPLITS,
    StreamBatches,
    StreamLoader,
    read_manifest,
    shards_source,
)
from recsys.errors import InputError, MissingInputError

log = logging.getLogger(__name__)


class ArtifactDataModule(L.LightningDataModule):
    """A processed folder set up for evaluation and scoring: its data, split rows, known
    pairs, evaluation protocol and the validation and test loaders.

    Built by `open` on the folder a checkpoint names (evaluate, predict, serving, the
    dashboard), or as the base of `recsys.data.base.RecDataModule`, which builds the folder
    from raw files first.

    Args:
        cache_dir: root folder of processed datasets.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: 4 x batch_size).
        split: ``{kind: random|temporal|leave_one_out, val: fraction, test: fraction,
            val_row: previous|random}`` (`recsys.data.split.split_indices`; ``val_row`` is
            leave_one_out's validation row).
        seed: seed of the split and of the per-epoch shuffles.
        feedback: ``explicit`` (labels from ratings) or ``implicit`` (every interaction is a
            positive; training batches add ``num_negatives`` sampled negatives per positive,
            drawn anew each epoch; validation/test rows get as many negatives, drawn once
            with ``seed``).
        num_negatives: negatives per positive under implicit feedback.
        ranking: ranking evaluation beside the pointwise one: ``sampled`` (each held-out
            positive against ``ranking_negatives`` negatives sampled once with ``seed`` and
            saved beside the processed data: the NCF protocol), ``full`` (every item not in
            the user's training interactions) or None.
        ranking_negatives: negatives per held-out positive in ``sampled`` ranking.
        drop_cold_start: leave out of validation and test the rows whose user or item has
            no training row (scored by untrained embeddings otherwise). Off by default: such
            rows are counted either way (``test/cold_user_rows``, ``test/cold_item_rows``).
        num_workers: DataLoader worker processes.
        pin_memory: DataLoader option.
        streaming: read the split rows from litdata shards (`recsys.data.stream`) instead
            of memory: ``prepare_data`` writes them in blocks of ``block_rows`` rows into the
            processed folder; training reads ``window_blocks`` blocks at a time, shuffled.
        shards_url: where the shards are read from, if not from the processed folder: a
            folder, a ``file://`` URL or an object-store URL (``s3://...``, ``gs://...``,
            `recsys.data.stream.shards_source`) holding a copy of
            the processed folder's ``shards-*`` folder; read through a local cache in
            ``<cache_dir>/stream`` of at most ``stream_cache_size``.
        even_eval_shards: every rank gets as many validation and test rows (up to
            ``world_size - 1`` rows are left out), as strategies whose evaluation steps are
            collective need (``trainer=torchrec`` sets it); the data itself is the same.
    """

    def __init__(
        self,
        cache_dir: str,
        batch_size: int = 1024,
        eval_batch_size: int | None = None,
        split: dict | None = None,
        seed: int = 42,
        feedback: str = "explicit",
        num_negatives: int = 4,
        ranking: str | None = None,
        ranking_negatives: int = 99,
        drop_cold_start: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        streaming: bool = False,
        block_rows: int = 65536,
        window_blocks: int = 8,
        shards_url: str | None = None,
        stream_cache_size: str = "25GB",
        even_eval_shards: bool = False,
    ):
        super().__init__()
        # the init arguments of a subclass too; in checkpoints as datamodule_hyper_parameters
        # (the run's config goes to the loggers whole, so not logged here)
        self.save_hyperparameters(logger=False)
        for key, value in self.hparams.items():
            self.hparams[key] = plain(value)  # Hydra containers: weights_only reads them
        if feedback not in ("explicit", "implicit"):
            raise InputError(f"data.feedback must be 'explicit' or 'implicit', got {feedback!r}")
        self.feedback = feedback
        self.num_negatives = num_negatives
        self.drop_cold_start = drop_cold_start
        # per evaluation split: rows whose user / item has no training row (and rows dropped)
        self.cold_rows: dict[str, dict[str, int]] = {}
        self.cache_dir = Path(cache_dir).expanduser()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 4 * batch_size
        self.split = {**SPLIT_DEFAULTS, **(split or {})}
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.streaming = streaming
        self.block_rows = block_rows
        self.window_blocks = window_blocks
        self.shards_url = shards_url
        self.stream_cache_size = stream_cache_size
        if streaming and num_workers:
            raise InputError(
                f"data.streaming=true reads shards in the loader's own process (litdata reads "
                f"ahead in threads): set data.num_workers=0 (got {num_workers})"
            )
        # the shards' manifest (`recsys.data.stream.read_manifest`) once set up to stream
        self.manifest: dict | None = None
        self.data: ProcessedDataset | None = None
        self.rows: dict[str, torch.Tensor] = {}
        # the pair sets behind `positives` and `train_positives`, built when first asked for
        self._positives: dict[str, PositiveSet] = {}
        # what validation and test score: pointwise pairs, ranking candidates, item statistics
        self.protocol = EvaluationProtocol(
            feedback=feedback,
            num_negatives=num_negatives,
            ranking=ranking,
            ranking_negatives=ranking_negatives,
            seed=seed,
            split=self.split,
            eval_batch_size=self.eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            drop_cold_start=drop_cold_start,
            even_eval_shards=even_eval_shards,
        )
        # the processed folder this module reads (`use_processed`); `RecDataModule` names its
        # own from the settings until a checkpoint pins one
        self._pinned: str | None = None
        # refuse checkpoints of other data (`load_state_dict`); off under allow_new_data
        self.check_data = True

    @classmethod
    def open(cls, processed: str, hparams: dict[str, Any]) -> ArtifactDataModule:
        """The folder ``<hparams["cache_dir"]>/<processed>`` with the data module
        hyperparameters ``hparams`` of the run that trained on it (those of the dataset's own
        module are kept as data settings, `data_settings`, and otherwise unused)."""
        known = inspect.signature(cls).parameters
        dm = cls(**{k: v for k, v in hparams.items() if k in known})
        dm.hparams.update({k: plain(v) for k, v in hparams.items() if k not in known})
        dm.use_processed(processed)
        if not dm.readable():
            raise MissingInputError(
                f"{dm.processed_dir} holds no processed data to "
                f"{'stream (shards)' if dm.streaming else 'load (interactions)'}: point "
                "paths.cache_dir at the folder that holds it"
            )
        return dm

    def readable(self) -> bool:
        """Whether the processed folder holds what this module reads: its metadata, and the
        interactions or, streamed, the shards' manifest."""
        folder = self.processed_dir
        rows = self.shards_dir / SHARDS_FILE if self.streaming else folder / INTERACTIONS_FILE
        return (folder / META_FILE).exists() and rows.exists()

    @property
    def even_eval_shards(self) -> bool:
        """Every rank gets as many evaluation rows (``data.even_eval_shards``; up to
        ``world_size - 1`` rows are left out): what strategies whose evaluation steps are
        collective need (trainer=torchrec sets it)."""
        return self.protocol.even_eval_shards

    @property
    def source(self) -> str:
        """Short name of the source and variant, e.g. ``ml-100k``."""
        return read_meta(self.processed_dir)["settings"]["source"]

    @property
    def processed_dir(self) -> Path:
        """The processed folder: ``<cache_dir>/<source>-<hash of settings and raw content>``."""
        if self._pinned is None:
            raise RuntimeError("no processed folder: call use_processed(name) first")
        return self.cache_dir / self._pinned

    def use_processed(self, name: str) -> None:
        """Read the processed folder ``<cache_dir>/<name>``, whatever the raw files are (they
        may be gone)."""
        self._pinned = name

    # --- data identity in checkpoints ----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: what data the model was trained on."""
        cls = type(self)
        return {
            "data_class": f"{cls.__module__}.{cls.__qualname__}",
            "processed": self.processed_dir.name,
            "settings": self.data_settings(),
        }

    def data_settings(self) -> dict[str, Any]:
        """The hyperparameters that make the data what it is (all but `FREE_KEYS`), the split
        with its defaults filled in."""
        return data_settings({**self.hparams, "split": self.split})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called by Lightning when a run resumes (or tests) a checkpoint: refuses other data.
        Without a Trainer (``load_from_checkpoint``) the module takes the checkpoint's processed
        folder (`use_processed`)."""
        if not self.check_data:
            return
        changes = self.settings_changes(state)
        if self.trainer is None and not changes:
            self.use_processed(state["processed"])
            return
        if not changes and state.get("processed") != self.processed_dir.name:
            changes = {"processed data": (state.get("processed"), self.processed_dir.name)}
        if changes:
            ckpt = getattr(self.trainer, "ckpt_path", None) if self.trainer else None
            raise DataMismatchError(
                f"{'the checkpoint' if ckpt is None else ckpt} was trained on other data "
                f"than this run's: "
                f"{describe_changes(changes)}. To resume it, run with its data settings"
                f"{restore_hint(changes)}; to train on this data, start a new run (no "
                f"ckpt_path)."
            )

    def settings_changes(self, state: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """``{dotted key: (checkpoint's value, this module's value)}`` of the data settings
        (hyperparameters but `FREE_KEYS`) that differ from those saved in ``state``."""
        return settings_changes(state.get("settings", {}), self.data_settings())

    # --- the folder --------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """The split rows, and what the evaluation protocol saves beside them (the sampled
        ranking candidates), unless they are in the folder; streamed data has them in its
        shards."""
        if self.streaming:
            return
        self._split_rows()
        self.protocol.prepare(self.processed_dir, self._load_split)

    @property
    def spec(self) -> FeatureSpec:
        """Sizes and features for the model (needs `prepare_data` to have run)."""
        if self.data is not None:
            return self.data.spec
        folder = self.processed_dir
        if not (folder / META_FILE).exists():
            raise RuntimeError(f"{self.source}: call prepare_data() before reading the spec")
        return FeatureSpec.from_dict(read_meta(folder)["spec"])

    def split_settings(self) -> dict[str, Any]:
        """What decides the split rows of the processed data: the split, its seed (but for
        the source's own split) and the cold-start rule."""
        settings: dict[str, Any] = {"split": self.split}
        if self.split["kind"] != "source":
            settings["seed"] = self.seed
        if self.drop_cold_start:
            settings["drop_cold_start"] = True
        return settings

    @property
    def split_path(self) -> Path:
        """``<processed folder>/split-<hash of split_settings>.npz``: the rows of each split
        (int64 arrays ``train``, ``val``, ``test``) and ``about``, a JSON text of the settings
        and the cold-start counts."""
        return self.processed_dir / f"{cache_key('split', self.split_settings())}.npz"

    def _split_rows(
        self, data: ProcessedDataset | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, int]]]:
        """The split rows and cold-start counts saved in the folder; split (`_split`) and
        saved first when they are not there yet."""
        path = self.split_path
        if not path.exists():
            rows, cold_rows = self._split(data or ProcessedDataset.load(self.processed_dir))
            about = json.dumps({"settings": self.split_settings(), "cold_rows": cold_rows})
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, about=np.array(about), **{k: v.numpy() for k, v in rows.items()})
            os.replace(tmp, path)
            return rows, cold_rows
        with np.load(path, allow_pickle=False) as saved:
            rows = {split: torch.from_numpy(saved[split]) for split in SPLITS}
            about = json.loads(str(saved["about"]))
        return rows, about["cold_rows"]

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        if self.streaming:
            self._setup_stream()
            return
        self.data = ProcessedDataset.load(self.processed_dir)
        self._check_supported(self.data.spec)
        self.rows, self.cold_rows = self._split_rows(self.data)
        self._positives = {}
        # every known pair, built when first sampled; not a lambda: ddp_spawn pickles this module
        all_pairs = partial(self._pair_set, "all")
        self.protocol.setup(self.processed_dir, self.data, self.rows, all_pairs)
        labels = self.data.interactions.labels
        log.info(
            "%s: %s; %s; positives %.1f%%",
            self.source,
            f"{self.spec.num_users:,} users, {self.spec.num_items:,} items"
            if self.spec.has_ids
            else f"no ids, {len(self.spec.sparse) + len(self.spec.dense)} row features",
            ", ".join(f"{k} {len(v):,}" for k, v in self.rows.items()),
            100 * float(labels.mean()) if len(labels) else 0.0,
        )

    @property
    def positives(self) -> PositiveSet | None:
        """Every known (user, item) pair, in any split: excluded from evaluation candidates
        and predictions. Built on first use (training never needs it, and it takes several
        bytes per interaction), None before `setup`."""
        return self._pair_set("all")

    @property
    def train_positives(self) -> PositiveSet | None:
        """The training pairs only: excluded from training negatives (the NCF protocol).
        Built on first use (explicit feedback never needs it), None before `setup`."""
        return self._pair_set("train")

    def _pair_set(self, which: str) -> PositiveSet | None:
        if self.data is None:
            return None
        if which not in self._positives:
            inter = self.data.interactions
            if inter is not None:
                rows = slice(None) if which == "all" else self.rows["train"]
                users, items = inter.users[rows], inter.items[rows]
            else:  # streamed: the id columns of every processed row, or of the training rows
                folder = self.processed_dir if which == "all" else self.shards_dir
                name = INTERACTIONS_FILE if which == "all" else "train_pairs.parquet"
                ids = read_columns(folder / name, {"user": np.int64, "item": np.int64}, 1 << 16)
                users, items = torch.from_numpy(ids["user"]), torch.from_numpy(ids["item"])
            self._positives[which] = PositiveSet(users, items, self.spec.num_items)
        return self._positives[which]

    def training_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users, items) int64 [N] of the training rows with a positive label: what a model
        fitted in closed form (`recsys.models.common.ClosedForm`) learns from."""
        inter = self.data.interactions
        if inter is None:
            raise InputError(
                "a model fitted in closed form (EASE, ItemKNN) needs the training rows in "
                "memory: set data.streaming=false"
            )
        rows = self.rows["train"]
        rows = rows[inter.labels[rows] > 0]
        return inter.users[rows], inter.items[rows]

    def _check_supported(self, spec: FeatureSpec) -> None:
        """Refuse settings this data cannot have: ranking and sampled negatives need user
        and item ids; ranking needs every interaction in memory."""
        if not spec.has_ids and (self.feedback == "implicit" or self.protocol.ranking):
            raise InputError(
                f"{self.source} has no user or item ids (a click log): data.feedback=implicit "
                "and data.ranking need them; use data.feedback=explicit data.ranking=null"
            )
        if self.streaming and self.protocol.ranking:
            raise InputError(
                f"data.ranking={self.protocol.ranking} needs every interaction in memory; with "
                "data.streaming=true evaluation is pointwise: set data.ranking=null, or "
                "data.streaming=false"
            )

    def item_label_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive and negative training examples per item, each float [num_items]: what the
        popularity baseline is calibrated on.

        Explicit feedback: the training rows' labels. Implicit feedback: every training row is
        a positive, and the negatives are what training draws (``num_negatives`` per positive
        among the user's non-training items), drawn once with ``seed`` so every process gets
        the same. Streamed data: as counted when the shards were written.
        """
        if self.data.interactions is None:  # streamed
            counts = self.manifest["item_label_counts"]
            return torch.tensor(counts["positives"]), torch.tensor(counts["negatives"])
        inter, rows, num_items = self.data.interactions, self.rows["train"], self.spec.num_items
        items = inter.items[rows]
        if self.feedback == "explicit":
            labels = inter.labels[rows].double()
            positives = torch.bincount(items, weights=labels, minlength=num_items)
            negatives = torch.bincount(items, minlength=num_items) - positives
            return positives.float(), negatives.float()
        g = torch.Generator().manual_seed(self.seed)
        sampled = self.train_positives.sample(inter.users[rows], self.num_negatives, generator=g)
        positives = torch.bincount(items, minlength=num_items)
        negatives = torch.bincount(sampled.flatten(), minlength=num_items)
        return positives.float(), negatives.float()

    def _load_split(self) -> tuple[ProcessedDataset, dict[str, torch.Tensor]]:
        """The processed data and its split rows, loaded anew (for `EvaluationProtocol.prepare`
        in ``prepare_data``, before `setup`)."""
        data = ProcessedDataset.load(self.processed_dir)
        return data, self._split_rows(data)[0]

    def _split(
        self, data: ProcessedDataset
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, int]]]:
        """The rows of each split, and per evaluation split the counts of rows whose user or
        item has no training row (with ``drop_cold_start`` such rows are removed)."""
        inter, spec = data.interactions, data.spec
        if self.split["kind"] == "source":
            rows = source_split(data.meta, self.source)
        elif not spec.has_ids and self.split["kind"] != "random":
            raise InputError(
                f"data.split.kind={self.split['kind']} splits each user's rows, and "
                f"{self.source} has no users: use data.split.kind=source (the source's own "
                "split) or random"
            )
        else:
            rows = split_indices(inter, seed=self.seed, **self.split)
        if not spec.has_ids:
            return rows, {"val": {}, "test": {}}
        train = rows["train"]
        trained_users = torch.bincount(inter.users[train], minlength=spec.num_users) > 0
        trained_items = torch.bincount(inter.items[train], minlength=spec.num_items) > 0
        cold_rows = {}
        for split in ("val", "test"):
            split_rows = rows[split]
            cold_user = ~trained_users[inter.users[split_rows]]
            cold_item = ~trained_items[inter.items[split_rows]]
            cold = cold_user | cold_item
            cold_rows[split] = {
                "cold_user_rows": int(cold_user.sum()),
                "cold_item_rows": int(cold_item.sum()),
            }
            action = "scored by untrained embeddings (data.drop_cold_start=true drops them)"
            if self.drop_cold_start:
                rows[split] = split_rows[~cold]
                cold_rows[split]["cold_rows_dropped"] = int(cold.sum())
                action = "dropped (data.drop_cold_start=true)"
            log.info(
                "%s: %s rows with a user without training rows: %d, with an item without "
                "training rows: %d, of %d; %s",
                self.source,
                split,
                int(cold_user.sum()),
                int(cold_item.sum()),
                len(split_rows),
                action,
            )
        return rows, cold_rows

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.streaming:
            return self._stream("val", shuffle=False, even=self.even_eval_shards)
        return self.protocol.loaders("val")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.streaming:
            return self._stream("test", shuffle=False, even=self.even_eval_shards)
        return self.protocol.loaders("test")

    # --- streaming --------------------------------------------------------------------------
    @property
    def shards_dir(self) -> Path:
        """``<processed folder>/shards-<hash>``: the split rows as shards, keyed by what
        decides them (`split_settings`) and the block size."""
        settings = {**self.split_settings(), "block_rows": self.block_rows}
        return self.processed_dir / cache_key("shards", settings)

    def _setup_stream(self) -> None:
        folder = self.shards_dir
        if not (folder / SHARDS_FILE).exists():
            raise MissingInputError(
                f"{folder / SHARDS_FILE} not found: call prepare_data() first (with "
                "data.shards_url, copy the processed folder's shards-* manifest and "
                "train_pairs.parquet beside its meta.json on this machine)"
            )
        self.manifest = read_manifest(folder)
        self.data = ProcessedDataset.load(self.processed_dir, interactions=False)
        self._check_supported(self.data.spec)
        self.rows, self.cold_rows = {}, self.manifest["cold_rows"]
        self._positives = {}
        popularity = self.manifest.get("item_popularity")
        self.protocol.setup_stream(
            self.data, None if popularity is None else torch.tensor(popularity).float()
        )
        log.info(
            "%s: streaming %s from %s",
            self.source,
            ", ".join(f"{k} {v['rows']:,}" for k, v in self.manifest["splits"].items()),
            self.shards_url or folder,
        )

    def _stream(self, split: str, shuffle: bool, even: bool, sample=None) -> StreamLoader:
        if self.manifest is None:
            raise RuntimeError(f"{self.source}: call setup() before asking for a loader")
        if self.shards_url:
            url = shards_source(f"{self.shards_url.rstrip('/')}/{split}")
            cache = self.cache_dir / "stream" / self.shards_dir.name / split
        else:
            url, cache = str(self.shards_dir / split), None
        batch_size = self.batch_size if split == "train" else self.eval_batch_size
        dataset = StreamBatches(
            url,
            cache,
            self.manifest,
            split,
            self.data.spec,
            self.data.features,
            batch_size,
            shuffle=shuffle,
            seed=self.seed,
            window_blocks=self.window_blocks,
            even=even,
            max_cache_size=self.stream_cache_size,
            sample=sample,
        )
        return StreamLoader(dataset, self._current_epoch, self.pin_memory)

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0
