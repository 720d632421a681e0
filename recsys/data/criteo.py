"""Criteo click logs (the Kaggle Display Advertising Challenge, the 1TB click logs) as a
DataModule: every feature belongs to the row, and the rows never sit in memory whole while
they are preprocessed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.data.base import RecDataModule
from recsys.data.clicklog import (
    CRITEO_DENSE,
    CRITEO_SPARSE,
    Vocabulary,
    VocabularyBuilder,
    criteo_files,
    read_chunks,
    resolve_layout,
    split_bounds,
)
from recsys.data.preprocess import FORMAT_VERSION, INTERACTIONS_FILE, META_FILE
from recsys.data.spec import DenseFeature, FeatureSpec, SparseFeature
from recsys.data.store import Interactions, RowFeatures
from recsys.data.stream import SPLITS, ShardWriter
from recsys.errors import InputError

log = logging.getLogger(__name__)

VOCAB_FILE = "vocabulary.npz"


class CriteoDataModule(RecDataModule):
    """Criteo's click logs in ``<data_dir>/criteo``: ``train.txt`` (Kaggle) or ``day_0`` ...
    ``day_23`` (1TB), plain or ``.gz``; a line is ``label \\t I1..I13 \\t C1..C26``.

    Preprocessing is DLRM's reference and MLPerf's (`recsys.data.clicklog`): integers
    ``log(1 + max(x, 0))``, categorical values to contiguous codes per feature after
    ``% max_ind_range`` (0: no cap), values seen in fewer than ``min_count`` rows code 0 with
    the missing ones. Two passes over the files, a chunk of ``chunk_rows`` rows at a time:
    the first counts the values of every row (the vocabulary, saved in the processed folder),
    the second writes the codes: as ``interactions.parquet`` in memory mode, as shards with
    ``streaming``. The split is the source's, in time order (``data.split.kind=source``):
    Kaggle's last seventh halved into validation and test, the 1TB logs' last day halved.

    Args:
        layout: ``kaggle``, ``terabyte`` or ``auto`` (the one whose files exist).
        days: days of the 1TB logs to read (2-24; the last one validates and tests).
        max_ind_range: hash cap per table (DLRM's ``--max-ind-range``), 0 for none.
        min_count: values in fewer rows get code 0.
        chunk_rows: rows read at a time.
        **kwargs: see `RecDataModule`.
    """

    def __init__(
        self,
        layout: str = "auto",
        days: int = 24,
        max_ind_range: int = 10_000_000,
        min_count: int = 1,
        chunk_rows: int = 1 << 20,
        **kwargs,
    ):
        kwargs.setdefault("split", {"kind": "source"})
        super().__init__(**kwargs)
        if self.feedback != "explicit":
            raise InputError("data=criteo: click logs hold their labels: data.feedback=explicit")
        self.layout = layout
        self.days = days
        self.max_ind_range = max_ind_range
        self.min_count = min_count
        self.chunk_rows = chunk_rows

    @property
    def source(self) -> str:
        layout = resolve_layout(self.raw_dir, self.layout)
        return "criteo-kaggle" if layout == "kaggle" else f"criteo-terabyte-{self.days}d"

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "criteo"

    def _files(self) -> list[Path]:
        return criteo_files(self.raw_dir, self.layout, self.days)

    def expected_files(self) -> list[str]:
        try:
            return [f.name for f in self._files()]
        except FileNotFoundError:  # named by `download`'s message
            return ["train.txt"] if resolve_layout(self.raw_dir, self.layout) == "kaggle" else []

    def download(self) -> None:
        self._files()  # raises, saying where the files come from

    def missing_files(self) -> list[str]:
        try:
            self._files()
        except FileNotFoundError:
            return self.expected_files() or ["day_0"]
        return []

    def settings(self) -> dict:
        settings = {
            **super().settings(),
            "max_ind_range": self.max_ind_range,
            "min_count": self.min_count,
        }
        settings.pop("rating_threshold")  # labels are given
        settings.pop("threshold_op")
        return settings

    # --- preprocessing ----------------------------------------------------------------------
    def build_processed(self, folder: Path) -> None:
        """The first pass: count rows and categorical values; write the metadata and the
        vocabulary. The codes are written when first needed (`prepare_data`)."""
        files = self._files()
        builder = VocabularyBuilder(self.max_ind_range, self.min_count)
        rows_per_file, positives = [], 0
        for path in files:
            n = 0
            for chunk in read_chunks(path, self.chunk_rows):
                builder.update(chunk.sparse)
                positives += int(chunk.label.sum())
                n += len(chunk)
            rows_per_file.append(n)
            log.info("%s: counted %s (%d rows)", self.source, path, n)
        vocab = builder.build()
        layout = resolve_layout(self.raw_dir, self.layout)
        spec = FeatureSpec.of_rows(
            sparse=tuple(
                SparseFeature(name, "row", size)
                for name, size in zip(CRITEO_SPARSE, vocab.sizes, strict=True)
            ),
            dense=tuple(DenseFeature(name, "row") for name in CRITEO_DENSE),
        )
        num_rows = sum(rows_per_file)
        rare = [int(c[c < self.min_count].sum()) for c in builder.counts]
        meta = {
            "format": FORMAT_VERSION,
            "source": self.source,
            "settings": self.settings(),
            "num_interactions": num_rows,
            "num_positives": positives,
            "spec": spec.to_dict(),
            "vocab": {},
            "files": {p.name: n for p, n in zip(files, rows_per_file, strict=True)},
            "split": split_bounds(rows_per_file, layout),
            "report": [
                {
                    "step": f"{name}: values in fewer than min_count={self.min_count} rows",
                    "rows": count,
                    "of": num_rows,
                    "action": "coded 0 (as missing):",
                }
                for name, count in zip(CRITEO_SPARSE, rare, strict=True)
                if count
            ],
        }
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            vocab.save(tmp / VOCAB_FILE)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _prepare_processed(self) -> None:
        super()._prepare_processed()
        path = self.processed_dir / INTERACTIONS_FILE
        if not self.streaming and not path.exists():
            self._write_parquet(path)

    def _rows(self) -> Iterator[tuple[str, Interactions]]:
        """The second pass: (split, rows as codes) for consecutive rows of the files."""
        meta = json.loads((self.processed_dir / META_FILE).read_text())
        bounds = meta["split"]
        vocab = Vocabulary.load(self.processed_dir / VOCAB_FILE)
        start = 0
        for path in self._files():
            for chunk in read_chunks(path, self.chunk_rows):
                codes = vocab.encode(chunk.sparse)
                stop = start + len(chunk)
                for split in SPLITS:
                    lo, hi = max(bounds[split][0], start), min(bounds[split][1], stop)
                    if lo < hi:
                        yield split, _interactions(chunk, codes, lo - start, hi - start)
                start = stop
        if start != meta["num_interactions"]:
            raise InputError(
                f"{self.raw_dir}: the files hold {start:,} rows now, {meta['num_interactions']:,}"
                " when they were counted: they changed during preprocessing; run again"
            )

    def _write_parquet(self, path: Path) -> None:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        schema = pa.schema(
            [("label", pa.float32())]
            + [(name, pa.int32()) for name in CRITEO_SPARSE]
            + [(name, pa.float32()) for name in CRITEO_DENSE]
        )
        with pq.ParquetWriter(tmp, schema) as writer:
            for _, rows in self._rows():
                columns = {"label": rows.labels.numpy()}
                columns.update({n: c.numpy() for n, c in rows.row.codes.items()})
                dense = rows.row.dense.numpy()
                columns.update({n: dense[:, j] for j, n in enumerate(CRITEO_DENSE)})
                writer.write_table(pa.table(columns, schema=schema))
        os.replace(tmp, path)
        log.info("%s: wrote %s", self.source, path)

    def write_shards(self, folder: Path) -> dict:
        spec = self.spec
        writers = {split: ShardWriter(folder / split, spec, self.block_rows) for split in SPLITS}
        for split, rows in self._rows():
            writers[split].add(rows)
        return {
            "splits": {split: w.close() for split, w in writers.items()},
            "cold_rows": {"val": {}, "test": {}},
        }


def _interactions(chunk, codes: np.ndarray, lo: int, hi: int) -> Interactions:
    """Rows ``lo:hi`` of a parsed chunk and its codes."""
    n = hi - lo
    block = torch.from_numpy(np.ascontiguousarray(codes[lo:hi]))
    return Interactions(
        users=None,
        items=None,
        labels=torch.from_numpy(chunk.label[lo:hi].copy()),
        ratings=torch.full((1,), float("nan")).expand(n),
        timestamps=torch.full((1,), -1, dtype=torch.long).expand(n),
        row=RowFeatures(
            codes={name: block[:, j] for j, name in enumerate(CRITEO_SPARSE)},
            lists={},
            dense=torch.from_numpy(np.ascontiguousarray(chunk.dense[lo:hi])),
        ),
    )
