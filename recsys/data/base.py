"""The DataModule every dataset shares: raw files to the processed folder (cached by settings
and content), and whole-batch training loaders; what reads the folder back (splits, evaluation
loaders) is `recsys.data.artifact.ArtifactDataModule`'s."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from recsys.data.artifact import ArtifactDataModule
from recsys.data.identity import DataMismatchError
from recsys.data.loader import BatchLoader, InteractionBatches, batch_sampler, data_device
from recsys.data.negatives import NegativeSamplingBatches, negative_batch
from recsys.data.preprocess import META_FILE, ProcessedData, cache_key, cached_digest
from recsys.data.store import ProcessedDataset, read_meta
from recsys.data.stream import SHARDS_FILE, SPLITS, ShardWriter, write_manifest
from recsys.errors import InputError, MissingInputError

log = logging.getLogger(__name__)


class RecDataModule(ArtifactDataModule):
    """Base class: a subclass says where its raw files are and how to preprocess them.

    ``prepare_data`` (one process per node) builds the processed folder
    ``<cache_dir>/<source>-<hash of settings>`` unless it exists, then (`ArtifactDataModule`)
    its split rows and the files of the evaluation protocol beside it; ``setup`` loads it as
    tensors. Loaders yield whole `Batch` objects: the training ones from here, the validation
    and test ones from ``protocol`` (an `EvaluationProtocol` built from these settings), which
    also gives the item statistics that beyond-accuracy metrics need.

    Subclasses implement `source`, `raw_dir`, `expected_files`, `preprocess` and, where the
    data can be fetched, `download`; they add their preprocessing options to `settings`.

    Args:
        data_dir: root folder of the raw datasets.
        cache_dir: root folder of processed datasets.
        rating_threshold: label = rating `threshold_op` rating_threshold.
        threshold_op: ``>`` or ``>=``.
        device: where the training data lives and its batches are built: ``cpu``, ``cuda``
            (the run's GPU: interactions, features and training pairs moved there once,
            batches built there without reading back from the device per step) or ``auto``
            (``cuda`` when the run has a GPU and the data takes under a quarter of its
            memory; `recsys.data.loader.data_device`).
        rebuild: preprocess again even if the processed folder exists.
        **kwargs: what reads the processed folder back: `ArtifactDataModule`'s arguments
            (batch sizes, split, seed, feedback, ranking, loaders, streaming).
    """

    def __init__(
        self,
        data_dir: str,
        cache_dir: str,
        rating_threshold: float = 3.0,
        threshold_op: str = ">",
        device: str = "auto",
        rebuild: bool = False,
        **kwargs: Any,
    ):
        # kwargs: what reads the processed folder back (`ArtifactDataModule`'s arguments)
        super().__init__(cache_dir=cache_dir, **kwargs)
        if threshold_op not in (">", ">="):
            raise InputError(f"data.threshold_op must be '>' or '>=', got {threshold_op!r}")
        self.data_dir = Path(data_dir).expanduser()
        self.rating_threshold = rating_threshold
        self.threshold_op = threshold_op
        self.rebuild = rebuild
        self.data_device = device
        self._digests: dict[str, str] | None = None
        self._announced: set[Path] = set()

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
        saves beside it (the split rows, the sampled ranking candidates), and with ``streaming``
        the shards."""
        self._prepare_processed()
        if self.streaming:
            self._prepare_shards()
        else:
            super().prepare_data()

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

    # --- streaming --------------------------------------------------------------------------
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
