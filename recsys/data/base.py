"""The DataModule every dataset shares: cache, splits and whole-batch training loaders; the
evaluation loaders are its `EvaluationProtocol`'s."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from recsys.config import plain
from recsys.data.identity import (
    FREE_KEYS,
    SPLIT_DEFAULTS,
    DataMismatchError,
    describe_changes,
    restore_hint,
    settings_changes,
)
from recsys.data.loader import BatchLoader, InteractionBatches, batch_sampler, data_device
from recsys.data.negatives import NegativeSamplingBatches, PositiveSet, negative_batch
from recsys.data.preprocess import META_FILE, ProcessedData, cache_key, cached_digest
from recsys.data.protocol import EvaluationProtocol
from recsys.data.spec import FeatureSpec
from recsys.data.split import source_split, split_indices
from recsys.data.store import ProcessedDataset, read_columns, read_meta
from recsys.data.stream import (
    SHARDS_FILE,
    SPLITS,
    ShardWriter,
    StreamBatches,
    StreamLoader,
    read_manifest,
    shards_source,
    write_manifest,
)
from recsys.errors import InputError, MissingInputError

log = logging.getLogger(__name__)


class RecDataModule(L.LightningDataModule):
    """Base class: a subclass says where its raw files are and how to preprocess them.

    ``prepare_data`` (one process per node) builds the processed folder
    ``<cache_dir>/<source>-<hash of settings>`` unless it exists, and the files of the
    evaluation protocol beside it (`EvaluationProtocol.prepare`); ``setup`` loads it as
    tensors and splits the rows. Loaders yield whole `Batch` objects: the training ones from
    here, the validation and test ones from ``protocol`` (an `EvaluationProtocol` built from
    these settings), which also gives the item statistics that beyond-accuracy metrics need.

    Subclasses implement `source`, `raw_dir`, `expected_files`, `preprocess` and, where the
    data can be fetched, `download`; they add their preprocessing options to `settings`.

    Args:
        data_dir: root folder of the raw datasets.
        cache_dir: root folder of processed datasets.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: 4 x batch_size).
        split: ``{kind: random|temporal|leave_one_out, val: fraction, test: fraction,
            val_row: previous|random}`` (`recsys.data.split.split_indices`; ``val_row`` is
            leave_one_out's validation row).
        seed: seed of the split and of the per-epoch shuffles.
        rating_threshold, threshold_op: label = rating `op` threshold (op ``>`` or ``>=``).
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
        num_workers, pin_memory: DataLoader options.
        device: where the training data lives and its batches are built: ``cpu``, ``cuda``
            (the run's GPU: interactions, features and training pairs moved there once,
            batches built there without reading back from the device per step) or ``auto``
            (``cuda`` when the run has a GPU and the data takes under a quarter of its
            memory; `recsys.data.loader.data_device`).
        rebuild: preprocess again even if the processed folder exists.
        streaming: read the split rows from litdata shards (`recsys.data.stream`) instead
            of memory: ``prepare_data`` writes them in blocks of ``block_rows`` rows into the
            processed folder; training reads ``window_blocks`` blocks at a time, shuffled.
        shards_url: where the shards are read from, if not from the processed folder: a
            folder, a ``file://`` URL or an object-store URL (``s3://...``, ``gs://...``,
            `recsys.data.stream.shards_source`) holding a copy of
            the processed folder's ``shards-*`` folder; read through a local cache in
            ``<cache_dir>/stream`` of at most ``stream_cache_size``.
    """

    def __init__(
        self,
        data_dir: str,
        cache_dir: str,
        batch_size: int = 1024,
        eval_batch_size: int | None = None,
        split: dict | None = None,
        seed: int = 42,
        rating_threshold: float = 3.0,
        threshold_op: str = ">",
        feedback: str = "explicit",
        num_negatives: int = 4,
        ranking: str | None = None,
        ranking_negatives: int = 99,
        drop_cold_start: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        device: str = "auto",
        rebuild: bool = False,
        streaming: bool = False,
        block_rows: int = 65536,
        window_blocks: int = 8,
        shards_url: str | None = None,
        stream_cache_size: str = "25GB",
    ):
        super().__init__()
        # the init arguments of the subclass too; in checkpoints as datamodule_hyper_parameters
        # (the run's config goes to the loggers whole, so not logged here)
        self.save_hyperparameters(logger=False)
        for key, value in self.hparams.items():
            self.hparams[key] = plain(value)  # Hydra containers: weights_only reads them
        if threshold_op not in (">", ">="):
            raise InputError(f"data.threshold_op must be '>' or '>=', got {threshold_op!r}")
        if feedback not in ("explicit", "implicit"):
            raise InputError(f"data.feedback must be 'explicit' or 'implicit', got {feedback!r}")
        self.feedback = feedback
        self.num_negatives = num_negatives
        self.drop_cold_start = drop_cold_start
        # per evaluation split: rows whose user / item has no training row (and rows dropped)
        self.cold_rows: dict[str, dict[str, int]] = {}
        self.data_dir = Path(data_dir).expanduser()
        self.cache_dir = Path(cache_dir).expanduser()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 4 * batch_size
        self.split = {**SPLIT_DEFAULTS, **(split or {})}
        self.seed = seed
        self.rating_threshold = rating_threshold
        self.threshold_op = threshold_op
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.data_device = device
        self.rebuild = rebuild
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
        )
        self._digests: dict[str, str] | None = None
        # the processed folder named by a checkpoint (`from_checkpoint`): used as it is
        self._pinned: str | None = None
        self._announced: set[Path] = set()
        # refuse checkpoints of other data (`load_state_dict`); off under allow_new_data
        self.check_data = True

    @property
    def even_eval_shards(self) -> bool:
        """Every rank gets as many evaluation rows (set by strategies whose steps are
        collective)."""
        return self.protocol.even_eval_shards

    @even_eval_shards.setter
    def even_eval_shards(self, value: bool) -> None:
        self.protocol.even_eval_shards = value

    # --- to implement -------------------------------------------------------------------
    @property
    def source(self) -> str:
        """Short name of the source and variant, e.g. ``ml-100k``."""
        raise NotImplementedError

    @property
    def raw_dir(self) -> Path:
        raise NotImplementedError

    def expected_files(self) -> list[str]:
        """Raw files that must be in `raw_dir`."""
        raise NotImplementedError

    def preprocess(self) -> ProcessedData:
        raise NotImplementedError

    def download(self) -> None:
        """Fetch the raw files into `raw_dir`; datasets that cannot be fetched say how to."""
        raise MissingInputError(self._missing_message())

    def settings(self) -> dict:
        """Everything preprocessing depends on: a change rebuilds the processed folder."""
        settings = {
            "source": self.source,
            "rating_threshold": self.rating_threshold,
            "threshold_op": self.threshold_op,
            "feedback": self.feedback,
        }
        if self.expected_files():  # an edited raw file is another dataset
            settings["raw_files"] = self._raw_digests()
        return settings

    # --- shared ---------------------------------------------------------------------------
    @property
    def processed_dir(self) -> Path:
        """``<cache_dir>/<source>-<hash of settings and raw content>``, or the folder named by
        the checkpoint this module was rebuilt from."""
        return self.cache_dir / (self._pinned or cache_key(self.source, self.settings()))

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
        settings = {k: v for k, v in self.hparams.items() if k not in FREE_KEYS}
        return {**settings, "split": dict(self.split)}

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

    def use_processed(self, name: str) -> None:
        """Load the processed folder ``<cache_dir>/<name>`` whatever the raw files are (they
        may be gone); when it is missing, `prepare_data` rebuilds it from raw files that give
        the same folder, and refuses others."""
        self._pinned = name

    def _raw_digests(self) -> dict[str, str | None]:
        """Content hash of each raw file (None: missing); computed once all are present."""
        if self._digests is not None:
            return self._digests
        cache = self.cache_dir / ".digests"
        digests = {f: cached_digest(self.raw_dir / f, cache) for f in self.expected_files()}
        if None not in digests.values():
            self._digests = digests
        return digests

    def missing_files(self) -> list[str]:
        return [f for f in self.expected_files() if not (self.raw_dir / f).is_file()]

    def _missing_message(self) -> str:
        return (
            f"{self.source}: raw files not found in {self.raw_dir}: expected "
            f"{', '.join(self.expected_files())} (missing: {', '.join(self.missing_files())}). "
            f"Put them there, or point paths.data_dir (env RECSYS_DATA_DIR) at the folder "
            f"that holds {self.raw_dir.name}/."
        )

    def prepare_data(self) -> None:
        """Build the processed folder unless it exists, then what the evaluation protocol
        saves beside it (the sampled ranking candidates), and with ``streaming`` the shards."""
        self._prepare_processed()
        if self.streaming:
            self._prepare_shards()
        else:
            self.protocol.prepare(self.processed_dir, self._load_split)

    def _prepare_processed(self) -> None:
        if self._pinned is not None and (self.processed_dir / META_FILE).exists():
            log.info(
                "%s: using processed data in %s (raw files not read)",
                self.source,
                self.processed_dir,
            )
            return
        if self.missing_files():
            self.download()
            if self.missing_files():
                message = self._missing_message()
                if self._pinned is not None:
                    message += (
                        f" The checkpoint's processed folder {self._pinned} is not in "
                        f"{self.cache_dir} either: point paths.cache_dir at the folder that "
                        "holds it."
                    )
                raise MissingInputError(message)
        if self._pinned is not None:
            built = cache_key(self.source, self.settings())
            if built != self._pinned:
                raise DataMismatchError(
                    f"{self.source}: the checkpoint's processed folder {self._pinned} is not in "
                    f"{self.cache_dir}, and the raw files in {self.raw_dir} give other data "
                    f"(processed data: {self._pinned} -> {built}). Point paths.cache_dir at the "
                    "folder that holds it, or paths.data_dir at the raw files it was built "
                    "from; allow_new_data=true evaluates on these files anyway."
                )
        folder = self.processed_dir
        if (folder / META_FILE).exists() and not self.rebuild:
            if folder not in self._announced:  # prepare_data runs again for every stage
                log.info("%s: using processed data in %s", self.source, folder)
                self._announced.add(folder)
            return
        self.build_processed(folder)
        meta = read_meta(folder)
        log.info(
            "%s: wrote %s (%d interactions, %d users, %d items)",
            self.source,
            folder,
            meta["num_interactions"],
            meta["spec"]["num_users"],
            meta["spec"]["num_items"],
        )

    def build_processed(self, folder: Path) -> None:
        """Write the processed folder: `preprocess` in memory, then `ProcessedData.save`.
        Sources larger than memory write it themselves, chunk by chunk."""
        processed = self.preprocess()
        if self.feedback == "implicit":
            n = len(processed.interactions)
            processed.interactions["label"] = np.ones(n, dtype=np.float32)
            processed.report.record("implicit feedback: every interaction", n, n, "labelled 1:")
        log.info(processed.report.summary())
        processed.save(folder, self.settings())

    @property
    def spec(self) -> FeatureSpec:
        """Sizes and features for the model (needs `prepare_data` to have run)."""
        if self.data is not None:
            return self.data.spec
        folder = self.processed_dir
        if not (folder / META_FILE).exists():
            raise RuntimeError(f"{self.source}: call prepare_data() before reading the spec")
        return FeatureSpec.from_dict(read_meta(folder)["spec"])

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        if self.streaming:
            self._setup_stream()
            return
        self.data = ProcessedDataset.load(self.processed_dir)
        self._check_supported(self.data.spec)
        self.rows, self.cold_rows = self._split(self.data)
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
                name = "interactions.parquet" if which == "all" else "train_pairs.parquet"
                ids = read_columns(folder / name, {"user": np.int64, "item": np.int64}, 1 << 16)
                users, items = torch.from_numpy(ids["user"]), torch.from_numpy(ids["item"])
            self._positives[which] = PositiveSet(users, items, self.spec.num_items)
        return self._positives[which]

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
        return data, self._split(data)[0]

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

    def train_dataloader(self) -> DataLoader:
        """Whole shuffled training batches; under implicit feedback each positive comes with
        ``num_negatives`` negatives drawn per batch (`NegativeSamplingBatches`)."""
        if self.data is None:
            raise RuntimeError(f"{self.source}: call setup() before asking for a loader")
        # Lightning's overfit_batches trains on the same first batches every epoch
        overfit = self.trainer is not None and self.trainer.overfit_batches > 0
        cpu = torch.device("cpu")
        accelerator = self.trainer.strategy.root_device if self.trainer is not None else cpu
        if self.streaming:
            data_device(self.data_device, accelerator, 0, streaming=True)  # refuses cuda
            sample = None
            if self.feedback == "implicit":
                sample = partial(
                    negative_batch, self.data.features, self.train_positives, self.num_negatives
                )
            return self._stream("train", shuffle=not overfit, even=True, sample=sample)
        features, inter, rows = self.data.features, self.data.interactions, self.rows["train"]
        positives = self.train_positives if self.feedback == "implicit" else None
        nbytes = inter.nbytes + features.nbytes + (positives.nbytes if positives else 0)
        device = data_device(self.data_device, accelerator, nbytes, self.num_workers)
        if device != cpu:  # every rank holds the data on its own device
            features, inter, rows = features.to(device), inter.to(device), rows.to(device)
            positives = None if positives is None else positives.to(device)
        if positives is not None:
            dataset = NegativeSamplingBatches(inter, features, positives, self.num_negatives)
        else:
            dataset = InteractionBatches(inter, features)
        sampler = batch_sampler(rows, self.batch_size, shuffle=not overfit, seed=self.seed)
        pin = self.pin_memory and device == cpu
        return BatchLoader(dataset, sampler, self.num_workers, pin)

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
        decides them (the split, its seed, the cold-start rule, the block size)."""
        settings = {"split": self.split, "block_rows": self.block_rows}
        if self.split["kind"] != "source":
            settings["seed"] = self.seed
        if self.drop_cold_start:
            settings["drop_cold_start"] = True
        return self.processed_dir / cache_key("shards", settings)

    def _prepare_shards(self) -> None:
        folder = self.shards_dir
        if (folder / SHARDS_FILE).exists() and not self.rebuild:
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            manifest = self.write_shards(tmp)
            write_manifest(tmp, self.block_rows, manifest.pop("splits"), manifest)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("%s: wrote shards in %s", self.source, folder)

    def write_shards(self, folder: Path) -> dict[str, Any]:
        """Write each split's rows as shards into ``folder/<split>``; returns the manifest's
        content (``splits``: rows and blocks of each; what the training run needs beside
        them: cold-start counts, item popularity). Validation and test get the pairs the
        evaluation protocol scores (implicit feedback: with their sampled negatives); the
        training positives are saved for the negative sampler (``train_pairs.parquet``).
        This one loads the processed data; sources larger than memory write shards of
        their own."""
        # set up in memory for the writing: what the protocol scores, the item statistics
        data = ProcessedDataset.load(self.processed_dir)
        self._check_supported(data.spec)
        self.data, self._positives = data, {}
        rows, cold_rows = self._split(data)
        self.rows = rows
        self.protocol.setup(self.processed_dir, data, rows, partial(self._pair_set, "all"))
        splits = {}
        for split in SPLITS:
            pairs = data.interactions.take(rows[split])
            if split != "train":
                pairs = self.protocol.eval_pairs(split)
            writer = ShardWriter(folder / split, data.spec, self.block_rows)
            for chunk in torch.arange(len(pairs)).split(self.block_rows):
                writer.add(pairs.take(chunk))
            splits[split] = writer.close()
        manifest: dict[str, Any] = {"splits": splits, "cold_rows": cold_rows}
        if data.spec.has_ids:
            train = data.interactions.take(rows["train"])
            manifest["item_popularity"] = self.protocol.item_popularity().tolist()
            positives, negatives = self.item_label_counts()
            manifest["item_label_counts"] = {
                "positives": positives.tolist(),
                "negatives": negatives.tolist(),
            }
            pq.write_table(
                pa.table({"user": train.users.int().numpy(), "item": train.items.int().numpy()}),
                folder / "train_pairs.parquet",
            )
        self.data, self.rows, self._positives = None, {}, {}
        return manifest

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
