"""The Criteo click-log format: reading it in bounded memory, its preprocessing, its splits.

A line of a Criteo file (the Kaggle Display Advertising Challenge's ``train.txt``, the 1TB
click logs' ``day_0`` ... ``day_23``, plain or ``.gz``) is 40 tab-separated fields::

    label \\t I1 ... I13 \\t C1 ... C26

``label`` is 0 or 1; ``I1..I13`` are integers (counts, some negative); ``C1..C26`` are
categorical values written as hexadecimal hashes (``68fd1e64``); an empty field is missing.

The preprocessing is DLRM's reference (facebookresearch/dlrm ``data_utils.py``) and MLPerf's:
an integer ``x`` becomes ``log(1 + max(x, 0))`` (missing: 0); a categorical value becomes
``int(hex, 16)``, reduced ``% max_ind_range`` when a cap is set (DLRM's ``--max-ind-range``),
then a contiguous id per feature (`Vocabulary`). Unlike DLRM, which reads a missing field as
the value ``0``, a missing value and one seen fewer than ``min_count`` times share code 0.

Everything here streams: `read_chunks` holds one chunk of rows, `VocabularyBuilder` the
counts of distinct values, so a file of hundreds of millions of rows takes a few GB.

Example::

    >>> import numpy as np
    >>> builder = VocabularyBuilder(max_ind_range=0, min_count=2, num_features=1)
    >>> builder.update(np.array([[0x68FD1E64], [0x1A], [0x68FD1E64], [-1]]))
    >>> vocab = builder.build()
    >>> vocab.sizes
    [2]
    >>> vocab.encode(np.array([[0x68FD1E64], [0x1A], [-1], [0x99]])).ravel().tolist()
    [1, 0, 0, 0]
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv

from recsys.errors import InputError, MissingInputError

CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_SPARSE = [f"C{i}" for i in range(1, 27)]
COLUMNS = ["label", *CRITEO_DENSE, *CRITEO_SPARSE]
LAYOUTS = ("kaggle", "terabyte")
TERABYTE_DAYS = 24
KAGGLE_URL = "https://ailab.criteo.com/ressources/"
TERABYTE_URL = "https://ailab.criteo.com/download-criteo-1tb-click-logs-dataset/"
MAX_HEX_DIGITS = 15  # the most that an int64 holds for every value

# hex digit (ASCII byte) -> its value; 255 for every other byte
_NIBBLE = np.full(256, 255, dtype=np.uint8)
for _digits, _first in ((b"0123456789", 0), (b"abcdef", 10), (b"ABCDEF", 10)):
    _NIBBLE[np.frombuffer(_digits, dtype=np.uint8)] = np.arange(_first, _first + len(_digits))
_HEX_CHARS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
# 16-bit number -> its 4 hex digits, as the 4 bytes of a uint32
_HEX_QUADS = (
    np.stack([_HEX_CHARS[(np.arange(1 << 16) >> s) & 0xF] for s in (12, 8, 4, 0)], axis=1)
    .view(np.uint32)
    .ravel()
)

_COLUMN_TYPES = {
    "label": pa.int8(),
    **{name: pa.int64() for name in CRITEO_DENSE},
    **{name: pa.string() for name in CRITEO_SPARSE},
}


@dataclass
class RawChunk:
    """Consecutive rows of one file, parsed and with the integer transform applied.

    Attributes:
        start: the file's row index (0-based) of the first row; line number = start + 1.
        label: float32 [n], 0 or 1.
        dense: float32 [n, 13], ``log(1 + max(x, 0))``; 0 where missing.
        sparse: int64 [n, 26], ``int(hex, 16)``; -1 where missing.
    """

    start: int
    label: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray

    def __len__(self) -> int:
        return len(self.label)


def dense_transform(ints: np.ndarray, missing: np.ndarray | None = None) -> np.ndarray:
    """``log(1 + max(x, 0))`` as float32, 0 where ``missing``."""
    out = np.log1p(np.maximum(ints, 0, dtype=np.float64)).astype(np.float32)
    if missing is not None:
        out[missing] = 0.0
    return out


def parse_hex(values: pa.Array) -> tuple[np.ndarray, int | None]:
    """The integers that hexadecimal strings write, vectorised, and the index of the first
    value that is not hexadecimal (None when all are). Returns int64 [n], -1 where the value
    is empty or null."""
    values = values.cast(pa.string()) if values.type != pa.string() else values
    n = len(values)
    out = np.full(n, -1, dtype=np.int64)
    validity, offsets_buf, data_buf = values.buffers()
    if n == 0 or data_buf is None:
        return out, None
    offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=n + 1, offset=4 * values.offset)
    data = np.frombuffer(data_buf, dtype=np.uint8)
    lengths = np.diff(offsets)
    if validity is not None:
        lengths = np.where(values.is_null().to_numpy(zero_copy_only=False), 0, lengths)
    present = lengths > 0
    width = int(lengths.max(initial=0))
    if width == 0:
        return out, None
    if width > MAX_HEX_DIGITS:
        return out, int(np.argmax(lengths > MAX_HEX_DIGITS))
    if validity is None and np.all((lengths == 0) | (lengths == width)):
        # the common case, Criteo's 8 digits or nothing: the present values lie end to end
        chars = data[offsets[0] : offsets[-1]].reshape(-1, width)
    else:  # mixed widths: right-align every value in `width` columns, padded with '0'
        starts, lens = offsets[:-1][present], lengths[present]
        pos = starts[:, None] + np.arange(width) - (width - lens)[:, None]
        chars = np.where(pos >= starts[:, None], data[np.maximum(pos, 0)], ord("0"))
    nibbles = _NIBBLE[chars]
    bad = np.any(nibbles == 255, axis=1)
    if bad.any():
        return out, int(np.flatnonzero(present)[np.argmax(bad)])
    parsed = np.zeros(len(nibbles), dtype=np.int64)
    for k in range(width):
        parsed <<= 4
        parsed |= nibbles[:, k]
    out[present] = parsed
    return out, None


def format_hex(values: np.ndarray) -> pa.StringArray:
    """Integers in [0, 2**32) as Criteo writes them, 8 lower-case hex digits; an empty
    string where the value is negative (missing). The inverse of `parse_hex`."""
    values = np.asarray(values, dtype=np.int64)
    present = values >= 0
    kept = values[present]
    if len(kept) and kept.max() >= 1 << 32:
        raise InputError(f"{kept.max()} does not fit in 8 hex digits")
    # each 16-bit half, most significant first, becomes its 4 digits
    chars = np.take(_HEX_QUADS, kept.astype(">u4").view(">u2"))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(present * 8, out=offsets[1:])
    return pa.StringArray.from_buffers(len(values), pa.py_buffer(offsets), pa.py_buffer(chars))


# --- reading --------------------------------------------------------------------------------


def _open_text(path: Path):
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")


def _describe_line(line: str) -> str | None:
    """What is wrong with one line of a Criteo file, or None."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != len(COLUMNS):
        return (
            f"{len(fields)} tab-separated fields, expected {len(COLUMNS)} "
            f"(label, I1..I13, C1..C26; an empty field for a missing value)"
        )
    if fields[0] not in ("0", "1"):
        return f"column label: {fields[0]!r} is not 0 or 1"
    for name, value in zip(CRITEO_DENSE, fields[1:14], strict=True):
        try:
            int(value or "0")
        except ValueError:
            return f"column {name}: {value!r} is not an integer"
    for name, value in zip(CRITEO_SPARSE, fields[14:], strict=True):
        if len(value) > MAX_HEX_DIGITS or value.strip("0123456789abcdefABCDEF"):
            return f"column {name}: {value!r} is not a hexadecimal value"
    return None


def _locate(path: Path, first_row: int, cause: Exception) -> InputError:
    """The error for a block that Arrow could not read: scans the file from ``first_row`` (the
    first row of the block) for the first bad line, which it names."""
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if number <= first_row:
                continue
            problem = _describe_line(line)
            if problem is not None:
                return _line_error(path, number, problem)
    return InputError(f"{path}: cannot be read as a Criteo file after line {first_row}: {cause}")


def _line_error(path: Path, line: int, problem: str) -> InputError:
    return InputError(
        f"{path}, line {line}: {problem}. A Criteo file has one impression a line: label "
        f"(0/1), 13 integers, 26 hex values, tab-separated; fix or remove the line, or check "
        f"that the file is a Criteo click log."
    )


def _parse_batch(batch: pa.RecordBatch, path: Path, start: int) -> RawChunk:
    label = batch.column(0)
    if label.null_count:
        row = int(np.flatnonzero(label.is_null().to_numpy(zero_copy_only=False))[0])
        raise _line_error(path, start + row + 1, "column label: empty, expected 0 or 1")
    label = label.to_numpy()
    bad = (label != 0) & (label != 1)
    if bad.any():
        row = int(np.argmax(bad))
        raise _line_error(path, start + row + 1, f"column label: {label[row]} is not 0 or 1")
    n = batch.num_rows
    dense = np.empty((n, len(CRITEO_DENSE)), dtype=np.float32)
    for j in range(len(CRITEO_DENSE)):
        column = batch.column(1 + j)
        ints = column.fill_null(0).to_numpy() if column.null_count else column.to_numpy()
        dense[:, j] = dense_transform(ints)
    sparse = np.empty((n, len(CRITEO_SPARSE)), dtype=np.int64)
    for j, name in enumerate(CRITEO_SPARSE):
        column = batch.column(1 + len(CRITEO_DENSE) + j)
        sparse[:, j], row = parse_hex(column)
        if row is not None:
            value = column[row].as_py()
            raise _line_error(path, start + row + 1, f"column {name}: {value!r} is not hex")
    return RawChunk(start, label.astype(np.float32), dense, sparse)


def _concat(chunks: Sequence[RawChunk]) -> RawChunk:
    if len(chunks) == 1:
        return chunks[0]
    return RawChunk(
        chunks[0].start,
        np.concatenate([c.label for c in chunks]),
        np.concatenate([c.dense for c in chunks]),
        np.concatenate([c.sparse for c in chunks]),
    )


def _slice(chunk: RawChunk, lo: int, hi: int) -> RawChunk:
    return RawChunk(chunk.start + lo, chunk.label[lo:hi], chunk.dense[lo:hi], chunk.sparse[lo:hi])


def read_chunks(path: Path, chunk_rows: int = 1 << 20) -> Iterator[RawChunk]:
    """The rows of a Criteo file (plain, or gzip when the name ends in ``.gz``) in file order,
    ``chunk_rows`` at a time (the last chunk holds the rest).

    Memory is bounded by the chunk: the file is read in blocks of whole lines of at most
    64 MB (`_line_blocks`), each parsed by Arrow's CSV reader on every core (not by Arrow's
    streaming reader, which reads ahead of its consumer without bound). A bad line (not 40
    fields, a label other than 0/1, an integer or hex field that does not parse, an empty
    label) raises `InputError` naming the file, the line, the column and the value; nothing
    is skipped.
    """
    path = Path(path)
    if chunk_rows < 1:
        raise InputError(f"chunk_rows must be at least 1, got {chunk_rows}")
    if not path.is_file():
        raise MissingInputError(f"{path}: no such file")
    # about 250 bytes a line: blocks near one chunk, within [64 KB, 64 MB]
    block = min(max(chunk_rows * 256, 1 << 16), 1 << 26)
    options = {
        "read_options": pcsv.ReadOptions(column_names=COLUMNS),
        "parse_options": pcsv.ParseOptions(delimiter="\t", quote_char=False),
        "convert_options": pcsv.ConvertOptions(
            column_types=_COLUMN_TYPES, null_values=[""], strings_can_be_null=False
        ),
    }
    rows = 0  # rows parsed so far
    pending: list[RawChunk] = []
    held = 0
    for text in _line_blocks(path, block):
        try:
            table = pcsv.read_csv(pa.BufferReader(text), **options)
        except pa.ArrowInvalid as e:
            raise _locate(path, rows, e) from None
        del text
        for batch in table.to_batches():
            if batch.num_rows == 0:
                continue
            pending.append(_parse_batch(batch, path, rows))
            rows += batch.num_rows
            held += batch.num_rows
        del table
        if held < chunk_rows:
            continue
        joined = _concat(pending)
        cut = 0
        while held - cut >= chunk_rows:
            yield _slice(joined, cut, cut + chunk_rows)
            cut += chunk_rows
        pending = [_slice(joined, cut, held)] if cut < held else []
        held -= cut
    if held:
        yield _concat(pending)


def _line_blocks(path: Path, size: int) -> Iterator[bytes]:
    """The bytes of the file (decompressed where it ends in ``.gz``), about ``size`` at a
    time, each block ending at the end of a line (the last at the end of the file)."""
    opener = gzip.open if path.suffix == ".gz" else open
    rest = b""
    with opener(path, "rb") as f:
        while data := f.read(size):
            data = rest + data if rest else data
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # no line ends in this block yet
                rest = data
                continue
            rest = data[cut:]
            yield data[:cut] if rest else data
    if rest:
        yield rest


def count_rows(path: Path) -> int:
    """The number of lines of a Criteo file (plain or ``.gz``), reading it in blocks."""
    opener = gzip.open if Path(path).suffix == ".gz" else open
    n = 0
    last = b"\n"
    with opener(path, "rb") as f:
        while block := f.read(1 << 24):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


# --- writing --------------------------------------------------------------------------------


def write_rows(
    sink: pa.NativeFile | str | Path,
    label: np.ndarray,
    ints: np.ndarray,
    sparse: np.ndarray,
    ints_missing: np.ndarray | None = None,
) -> None:
    """Appends rows in the Criteo layout to ``sink`` (an open Arrow output stream, or a path to
    create): ``label`` [n] 0/1, ``ints`` int64 [n, 13] (empty where ``ints_missing``),
    ``sparse`` int64 [n, 26] written as 8 hex digits (empty where negative)."""
    columns = [pa.array(np.asarray(label, dtype=np.int8))]
    for j in range(ints.shape[1]):
        mask = None if ints_missing is None else ints_missing[:, j]
        columns.append(pa.array(ints[:, j], type=pa.int64(), mask=mask))
    columns += [format_hex(sparse[:, j]) for j in range(sparse.shape[1])]
    table = pa.Table.from_arrays(columns, names=COLUMNS)
    pcsv.write_csv(
        table,
        sink,
        pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none"),
    )


# --- vocabulary -----------------------------------------------------------------------------


def hash_values(sparse: np.ndarray, max_ind_range: int) -> np.ndarray:
    """``value % max_ind_range`` where a value is present and the cap is positive; -1 (missing)
    stays -1."""
    if max_ind_range <= 0:
        return sparse
    return np.where(sparse >= 0, sparse % max_ind_range, -1)


HASH_COUNT_BELOW = 1 << 17  # distinct values so far under which a chunk is counted by hashing


def _value_counts(values: np.ndarray, few: bool) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values, sorted, and their counts: by hashing (pandas) where they are
    ``few`` (a small sort after), else by sorting the chunk (NumPy), the faster of the two
    for many distinct values."""
    if not few:
        return np.unique(values, return_counts=True)
    counts = pd.Series(values, copy=False).value_counts(sort=False)
    distinct = counts.index.to_numpy()
    order = np.argsort(distinct)
    return distinct[order], counts.to_numpy()[order]


class VocabularyBuilder:
    """Counts the (hashed) values of each categorical feature over the rows it is given.

    Memory is that of the distinct values (16 bytes each), not of the rows: a chunk's values
    are counted and merged into a running sorted (values, counts) pair per feature.

    Args:
        max_ind_range: values are taken ``% max_ind_range`` first; <= 0: no cap.
        min_count: values seen fewer times than this get code 0 (`build`); <= 1 keeps all.
        num_features: columns of the arrays given to `update`.
    """

    def __init__(
        self, max_ind_range: int = 0, min_count: int = 1, num_features: int = len(CRITEO_SPARSE)
    ):
        self.max_ind_range = int(max_ind_range)
        self.min_count = int(min_count)
        self.values = [np.empty(0, dtype=np.int64) for _ in range(num_features)]
        self.counts = [np.empty(0, dtype=np.int64) for _ in range(num_features)]
        self.rows = 0

    def update(self, sparse: np.ndarray) -> None:
        """Counts the values of int64 [n, num_features] (-1: missing, not counted)."""
        if sparse.ndim != 2 or sparse.shape[1] != len(self.values):
            raise InputError(
                f"expected sparse values of shape [n, {len(self.values)}], got {sparse.shape}"
            )
        hashed = hash_values(sparse, self.max_ind_range)
        for j in range(len(self.values)):
            column = hashed[:, j]
            old = self.values[j]
            new, counts = _value_counts(column[column >= 0], few=len(old) < HASH_COUNT_BELOW)
            at = np.searchsorted(old, new)
            seen = at < len(old)
            seen[seen] = old[at[seen]] == new[seen]
            self.counts[j][at[seen]] += counts[seen]
            fresh = ~seen
            self.values[j] = np.insert(old, at[fresh], new[fresh])
            self.counts[j] = np.insert(self.counts[j], at[fresh], counts[fresh])
        self.rows += len(sparse)

    def build(self) -> Vocabulary:
        keep = [c >= self.min_count for c in self.counts]
        return Vocabulary(
            values=[v[k] for v, k in zip(self.values, keep, strict=True)],
            counts=[c[k] for c, k in zip(self.counts, keep, strict=True)],
            max_ind_range=self.max_ind_range,
            min_count=self.min_count,
        )


@dataclass
class Vocabulary:
    """Per feature, the (hashed) values that get codes 1..n_f, sorted; code 0 is missing or
    rare (fewer than ``min_count`` rows) or unseen.

    Attributes:
        values: per feature, int64 [n_f] sorted: ``values[f][k]`` has code ``k + 1``.
        counts: per feature, int64 [n_f]: the rows that hold each value.
        max_ind_range, min_count: the settings it was built with (`VocabularyBuilder`).
    """

    values: list[np.ndarray]
    counts: list[np.ndarray]
    max_ind_range: int
    min_count: int

    @property
    def sizes(self) -> list[int]:
        """Embedding rows per feature: n_f + 1 (code 0)."""
        return [len(v) + 1 for v in self.values]

    def encode(self, sparse: np.ndarray) -> np.ndarray:
        """int64 [n, F] values (-1: missing) -> int32 [n, F] codes."""
        if sparse.ndim != 2 or sparse.shape[1] != len(self.values):
            raise InputError(
                f"expected sparse values of shape [n, {len(self.values)}], got {sparse.shape}"
            )
        hashed = hash_values(sparse, self.max_ind_range)
        codes = np.zeros(sparse.shape, dtype=np.int32)
        for j, values in enumerate(self.values):
            if len(values) == 0:
                continue
            column = hashed[:, j]
            at = np.searchsorted(values, column)
            found = values[np.minimum(at, len(values) - 1)] == column
            codes[:, j] = np.where(found & (column >= 0), at + 1, 0)
        return codes

    def save(self, path: Path) -> None:
        """Writes an ``.npz`` (uncompressed: the values are hashes, they hardly compress)."""
        arrays = {"settings": np.array([self.max_ind_range, self.min_count], dtype=np.int64)}
        for j, (v, c) in enumerate(zip(self.values, self.counts, strict=True)):
            arrays[f"values_{j}"] = v
            arrays[f"counts_{j}"] = c
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        with np.load(path) as data:
            max_ind_range, min_count = (int(x) for x in data["settings"])
            n = sum(1 for key in data.files if key.startswith("values_"))
            return cls(
                values=[data[f"values_{j}"] for j in range(n)],
                counts=[data[f"counts_{j}"] for j in range(n)],
                max_ind_range=max_ind_range,
                min_count=min_count,
            )


# --- files and splits -----------------------------------------------------------------------


def _existing(raw_dir: Path, name: str) -> Path | None:
    for candidate in (raw_dir / name, raw_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def resolve_layout(raw_dir: Path, layout: str) -> str:
    """``kaggle`` or ``terabyte``: the given one, or for ``auto`` the one whose files exist
    (``train.txt`` -> kaggle, else ``day_0`` -> terabyte; kaggle when neither does)."""
    if layout not in ("auto", *LAYOUTS):
        raise InputError(f"data.layout={layout!r} is not one of {['auto', *LAYOUTS]}")
    if layout != "auto":
        return layout
    if _existing(Path(raw_dir), "train.txt") is None and _existing(Path(raw_dir), "day_0"):
        return "terabyte"
    return "kaggle"


def criteo_files(raw_dir: Path, layout: str = "auto", days: int = TERABYTE_DAYS) -> list[Path]:
    """The files of a Criteo data set in ``raw_dir``, in time order: ``train.txt`` (kaggle) or
    ``day_0`` ... ``day_<days-1>`` (terabyte; ``days`` < 24 takes the first days only, e.g.
    for a smaller subset); each plain or ``.gz``, whichever exists.

    Raises:
        MissingInputError: a file is missing; the message says where to get the data.
    """
    raw_dir = Path(raw_dir)
    layout = resolve_layout(raw_dir, layout)
    if layout == "kaggle":
        found = _existing(raw_dir, "train.txt")
        if found is None:
            raise MissingInputError(
                f"criteo: {raw_dir / 'train.txt'} not found. Get the Criteo Display Advertising "
                f"Challenge data set from {KAGGLE_URL} (dac.tar.gz, which holds train.txt) and "
                f"put train.txt (or train.txt.gz) in {raw_dir}, or point paths.data_dir (env "
                f"RECSYS_DATA_DIR) at the folder that holds criteo/; or generate a file with "
                f"`python -m recsys.data.synthetic format=criteo out=<data_dir>`."
            )
        return [found]
    if not 2 <= days <= TERABYTE_DAYS:
        raise InputError(
            f"data.days={days}: the 1TB click logs have {TERABYTE_DAYS} days; take 2 to "
            f"{TERABYTE_DAYS} (the last one is halved into validation and test)"
        )
    found = [_existing(raw_dir, f"day_{d}") for d in range(days)]
    missing = [f"day_{d}" for d, f in enumerate(found) if f is None]
    if missing:
        raise MissingInputError(
            f"criteo: {len(missing)} of the {days} days of the 1TB click logs are not in "
            f"{raw_dir} (missing: {', '.join(missing)}; each as day_<d> or day_<d>.gz). Get "
            f"them from {TERABYTE_URL}, or take fewer days (data.days), or generate them with "
            f"`python -m recsys.data.synthetic format=criteo layout=terabyte days={days} "
            f"out=<data_dir>`."
        )
    return found


def split_bounds(rows_per_file: Sequence[int], layout: str) -> dict[str, tuple[int, int]]:
    """Global row ranges [start, end) of train, val and test over the files in order, in time
    order as the reference implementations split them.

    ``kaggle``: DLRM's reference (``data_utils.py``) cuts the ``n`` rows into 7 "days" with
    ``divmod(n, 7)``, the remainder going to the first days, so the last day has ``n // 7``
    rows; train is the first ``n - n // 7`` rows. ``terabyte``: train is every file but the
    last (days 0..22 of 24, MLPerf). The last day is halved with ``np.array_split(..., 2)``,
    the first half taking the odd row: val is the first ``ceil(m / 2)`` rows, test the rest,
    as TorchRec's Criteo pipeline names them (DLRM's ``data_utils.py`` names the first half
    test and the second val).
    """
    if layout not in LAYOUTS:
        raise InputError(f"layout={layout!r} is not one of {list(LAYOUTS)}")
    n = int(sum(rows_per_file))
    if layout == "kaggle":
        last = n // 7
    else:
        if len(rows_per_file) < 2:
            raise InputError("the terabyte layout needs at least 2 days (train, then val/test)")
        last = int(rows_per_file[-1])
    train_end = n - last
    val_end = train_end + math.ceil(last / 2)
    return {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, n)}
