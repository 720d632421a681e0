"""Criteo-layout click logs drawn from a known click model, with the oracle's AUROC.

`generate_criteo` writes ``<out>/criteo/train.txt`` (the Kaggle layout) or ``day_0`` ...
(the 1TB layout), plain or gzip, in chunks (memory does not grow with the rows), and
``<out>/criteo/oracle.json``: the AUROC and log loss of the true click probabilities on the
validation and test rows (`recsys.data.clicklog.split_bounds`), the best that any model can
score there. Command line: ``python -m recsys.data.synthetic format=criteo ...``.

The click model (`CriteoClickModel`):

- categorical features take Criteo Kaggle's cardinalities (3 to 10^7 values), each value
  drawn from a power law over its ranks (exponent 0.8 for the largest features, so that most
  of their values are rare, up to 1.2 for the small ones), with Criteo-like missing rates;
  a value is written as 8 hex digits of a hash of (feature, rank);
- integer features are log-normal counts (``I2`` also takes -1..-3), with missing rates from
  none to 77%;
- ``logit = bias + sum_f s_f w_f(value) + sum_(f,g) c <u_f(value), u_g(value)> / sqrt(k)
  + sum_j beta_j z_j + missing_j``: per-value weights ``w`` and latent factors ``u`` (k=4)
  are normal draws from a seeded hash of (feature, value), so even 10^7 values cost no
  memory; a missing value has a weight of its own; ``z_j`` is ``log1p(max(x, 0))``
  standardised; ``bias`` is solved for a click rate of 25.6% (Criteo Kaggle's).

The same seed gives the same bytes, whatever the layout: rows are drawn in fixed chunks of
``CHUNK_ROWS``, each from its own stream of the seed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torchmetrics.functional.classification import binary_auroc

from recsys.data.clicklog import (
    LAYOUTS,
    TERABYTE_DAYS,
    split_bounds,
    write_rows,
)
from recsys.errors import InputError

CHUNK_ROWS = 1 << 18
TARGET_CTR = 0.256
LATENT_DIM = 4
ORACLE_ROWS = 20_000_000  # rows above which the all-rows AUROC takes every k-th row
TABLE_MAX = 1 << 20  # categorical features with at most this many values keep tables
MISSING_KEY = 1 << 33  # a missing value's key: outside the 32-bit hex values

# Per categorical feature: cardinality (Criteo Kaggle's, as DLRM counts them), power-law
# exponent, missing rate, scale of its per-value weight in the logit.
SPARSE_SPEC = [
    (1460, 1.2, 0.0, 0.35),
    (583, 1.2, 0.0, 0.35),
    (10131227, 0.8, 0.034, 0.25),
    (2202608, 0.9, 0.034, 0.2),
    (305, 1.2, 0.0, 0.3),
    (24, 1.2, 0.12, 0.3),
    (12517, 1.1, 0.0, 0.3),
    (633, 1.2, 0.0, 0.3),
    (3, 1.2, 0.0, 0.2),
    (93145, 1.0, 0.0, 0.2),
    (5683, 1.1, 0.0, 0.3),
    (8351593, 0.8, 0.034, 0.2),
    (3194, 1.1, 0.0, 0.3),
    (27, 1.2, 0.0, 0.3),
    (14992, 1.1, 0.0, 0.2),
    (5461306, 0.8, 0.034, 0.2),
    (10, 1.2, 0.0, 0.3),
    (5652, 1.1, 0.0, 0.3),
    (2173, 1.1, 0.44, 0.3),
    (4, 1.2, 0.44, 0.0),
    (7046547, 0.8, 0.034, 0.2),
    (18, 1.2, 0.76, 0.0),
    (15, 1.2, 0.0, 0.35),
    (286181, 1.0, 0.034, 0.2),
    (105, 1.2, 0.44, 0.3),
    (142572, 1.0, 0.44, 0.2),
]
# Per integer feature: mean and sd of log(1 + x), missing rate, coefficient of the
# standardised log1p value, effect of being missing.
DENSE_SPEC = [
    (0.6, 1.0, 0.45, 0.3, -0.2),
    (2.0, 2.0, 0.0, 0.0, 0.0),
    (2.0, 1.2, 0.21, -0.1, 0.0),
    (1.8, 1.0, 0.22, 0.0, 0.1),
    (7.5, 2.0, 0.026, -0.2, 0.0),
    (3.5, 1.5, 0.22, 0.15, 0.0),
    (1.5, 1.4, 0.043, 0.25, 0.0),
    (2.3, 1.0, 0.0005, 0.0, 0.0),
    (3.8, 1.3, 0.043, 0.1, 0.0),
    (0.3, 0.6, 0.45, 0.3, -0.1),
    (1.0, 1.0, 0.043, 0.2, 0.0),
    (0.3, 0.8, 0.77, 0.0, 0.0),
    (1.8, 1.0, 0.22, -0.15, 0.0),
]
# Pairs of categorical features (0-based) whose latent factors interact, and the scale.
PAIRS = [(0, 1), (4, 13), (6, 10), (12, 17), (2, 22), (7, 24)]
PAIR_SCALE = 0.6
SIGNAL = 0.7  # overall scale of the logit around the bias: the oracle AUROC is about 0.81


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, the hash behind every seeded draw of the model: uint64 ->
    uint64."""
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_normal(x: np.ndarray, salt: np.uint64) -> np.ndarray:
    """A standard normal draw per value of ``x`` that depends only on (value, salt):
    Box-Muller on the two 32-bit halves of a hash."""
    h = splitmix64(np.asarray(x, dtype=np.uint64) ^ salt)
    u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) / 2.0**32
    u2 = ((h & np.uint64(0xFFFFFFFF)).astype(np.float64) + 0.5) / 2.0**32
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


@dataclass
class Sample:
    """Rows drawn from the click model: what the file holds, and the true probability."""

    label: np.ndarray  # int8 [n]
    prob: np.ndarray  # float32 [n]
    ints: np.ndarray  # int64 [n, 13]
    ints_missing: np.ndarray  # bool [n, 13]
    sparse: np.ndarray  # int64 [n, 26], -1 missing


@dataclass
class _Terms:
    """A categorical feature's part of the logit, per value: its weight (times its scale)
    and, per pair it belongs to, its latent factors."""

    weight: np.ndarray  # [n]
    latent: dict[int, np.ndarray]  # pair index -> [n, LATENT_DIM]

    def take(self, index: np.ndarray) -> _Terms:
        return _Terms(self.weight[index], {p: v[index] for p, v in self.latent.items()})


class CriteoClickModel:
    """The known click model (see the module's docstring); ``seed`` picks its weights.

    Everything about a categorical value (its hex value, weight and latent factors) is a
    hash of (seed, feature, rank); features of at most `TABLE_MAX` values keep these in
    tables indexed by rank, the larger ones hash each row's value.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._tables: dict[int, tuple[np.ndarray, _Terms]] = {}
        self._missing: dict[int, _Terms] = {}
        for f, (card, *_) in enumerate(SPARSE_SPEC):
            self._missing[f] = self._terms(f, np.array([MISSING_KEY]))
            if card <= TABLE_MAX:
                values = self._values(f, np.arange(card, dtype=np.uint64))
                self._tables[f] = (values, self._terms(f, values))
        self.bias = 0.0
        self.bias = self._solve_bias()

    def _salt(self, kind: int, feature: int, dim: int = 0) -> np.uint64:
        return splitmix64(np.uint64((self.seed << 24) | (kind << 16) | (feature << 8) | dim))

    def _values(self, f: int, rank: np.ndarray) -> np.ndarray:
        """The 32-bit hex values (int64) of ranks of feature ``f``."""
        return (splitmix64(rank ^ self._salt(0, f)) >> np.uint64(32)).astype(np.int64)

    def _terms(self, f: int, values: np.ndarray) -> _Terms:
        weight = SPARSE_SPEC[f][3] * hash_normal(values, self._salt(1, f))
        latent = {
            p: np.stack(
                [
                    hash_normal(values, self._salt(2 + pair.index(f), p, d))
                    for d in range(LATENT_DIM)
                ],
                axis=1,
            )
            for p, pair in enumerate(PAIRS)
            if f in pair
        }
        return _Terms(weight, latent)

    def _solve_bias(self) -> float:
        """The bias whose mean click probability over 2^17 pilot rows is `TARGET_CTR`."""
        logit = self._draw(np.random.default_rng([self.seed, 1 << 40]), 1 << 17)[2]
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            ctr = np.mean(1.0 / (1.0 + np.exp(-(logit + mid))))
            lo, hi = (mid, hi) if ctr < TARGET_CTR else (lo, mid)
        return (lo + hi) / 2

    def _draw(self, rng: np.random.Generator, n: int):
        ints = np.empty((n, len(DENSE_SPEC)), dtype=np.int64)
        ints_missing = rng.random((n, len(DENSE_SPEC))) < [s[2] for s in DENSE_SPEC]
        logit = np.zeros(n, dtype=np.float64)
        for j, (mu, sd, _, beta, missing_effect) in enumerate(DENSE_SPEC):
            z = rng.standard_normal(n)
            ints[:, j] = np.expm1(np.maximum(mu + sd * z, 0.0)).astype(np.int64)
            if beta:
                logit += beta * np.where(ints_missing[:, j], 0.0, z)
            if missing_effect:
                logit += missing_effect * ints_missing[:, j]
        # Criteo's I2 takes small negative values now and then
        negative = rng.random(n) < 0.05
        ints[negative, 1] = -rng.integers(1, 4, size=int(negative.sum()))

        sparse = np.empty((n, len(SPARSE_SPEC)), dtype=np.int64)
        u = rng.random((n, len(SPARSE_SPEC)))
        missing = rng.random((n, len(SPARSE_SPEC))) < [s[2] for s in SPARSE_SPEC]
        latent: dict[int, list[np.ndarray]] = {p: [] for p in range(len(PAIRS))}
        for f, (card, exponent, _, _) in enumerate(SPARSE_SPEC):
            # a continuous power law on [1, card + 1) by its inverse CDF, floored to a rank
            if abs(exponent - 1.0) < 1e-9:
                x = np.power(card + 1.0, u[:, f])
            else:
                a = 1.0 - exponent
                x = np.power(1.0 + u[:, f] * ((card + 1.0) ** a - 1.0), 1.0 / a)
            rank = np.minimum(x.astype(np.int64) - 1, card - 1)
            if f in self._tables:
                table, terms = self._tables[f]
                values, terms = table[rank], terms.take(rank)
            else:
                values = self._values(f, rank.astype(np.uint64))
                terms = self._terms(f, values)
            gone = missing[:, f]
            sparse[:, f] = np.where(gone, -1, values)
            logit += np.where(gone, self._missing[f].weight, terms.weight)
            for p, factors in terms.latent.items():
                latent[p].append(np.where(gone[:, None], self._missing[f].latent[p], factors))
        for left, right in latent.values():
            logit += PAIR_SCALE / math.sqrt(LATENT_DIM) * np.einsum("nk,nk->n", left, right)
        return ints, ints_missing, SIGNAL * logit, sparse

    def sample(self, rng: np.random.Generator, n: int) -> Sample:
        ints, ints_missing, logit, sparse = self._draw(rng, n)
        prob = 1.0 / (1.0 + np.exp(-(logit + self.bias)))
        label = (rng.random(n) < prob).astype(np.int8)
        return Sample(label, prob.astype(np.float32), ints, ints_missing, sparse)


def _rows_per_file(rows: int, layout: str, days: int) -> list[int]:
    if layout == "kaggle":
        return [rows]
    per_day, extra = divmod(rows, days)
    return [per_day + (d < extra) for d in range(days)]


def _scores(prob: np.ndarray, label: np.ndarray) -> dict:
    """Click rate, AUROC (torchmetrics) and log loss of the probabilities ``prob``."""
    p, y = torch.from_numpy(prob).double(), torch.from_numpy(label.astype(np.int64))
    return {
        "ctr": float(label.mean()),
        "auroc": float(binary_auroc(p, y)) if 0 < y.sum() < len(y) else None,
        "logloss": float(torch.nn.functional.binary_cross_entropy(p, y.double())),
    }


class _Oracle:
    """The true probabilities and labels that the oracle's scores need: every row of the
    val and test splits, and every ``stride``-th row of all (every row up to `ORACLE_ROWS`)."""

    def __init__(self, rows: int, bounds: dict[str, tuple[int, int]]):
        self.bounds = bounds
        self.held_from = bounds["val"][0]
        self.prob = np.empty(rows - self.held_from, dtype=np.float32)
        self.label = np.empty(rows - self.held_from, dtype=np.int8)
        self.stride = max(1, math.ceil(rows / ORACLE_ROWS))
        self.sampled: list[tuple[np.ndarray, np.ndarray]] = []
        self.clicks = dict.fromkeys(bounds, 0)

    def add(self, s: Sample, start: int) -> None:
        """Rows ``start ..`` of the data set."""
        n = len(s.label)
        keep = slice((-start) % self.stride, n, self.stride)
        self.sampled.append((s.prob[keep], s.label[keep]))
        for name, (lo, hi) in self.bounds.items():
            self.clicks[name] += int(s.label[max(lo - start, 0) : max(hi - start, 0)].sum())
        lo = max(self.held_from - start, 0)
        if lo < n:
            at = start + lo - self.held_from
            self.prob[at : at + n - lo] = s.prob[lo:]
            self.label[at : at + n - lo] = s.label[lo:]

    def scores(self) -> dict:
        splits = {}
        for name, (lo, hi) in self.bounds.items():
            entry = {"range": [lo, hi], "rows": hi - lo, "ctr": self.clicks[name] / (hi - lo)}
            if name != "train":
                part = slice(lo - self.held_from, hi - self.held_from)
                entry.update(_scores(self.prob[part], self.label[part]))
            splits[name] = entry
        prob = np.concatenate([p for p, _ in self.sampled])
        label = np.concatenate([y for _, y in self.sampled])
        return {
            "splits": splits,
            "all": {"rows": len(prob), "stride": self.stride, **_scores(prob, label)},
        }


def generate_criteo(
    out: Path,
    rows: int,
    layout: str = "kaggle",
    days: int = TERABYTE_DAYS,
    seed: int = 0,
    gzip: bool = False,
) -> dict:
    """Writes ``rows`` impressions in the Criteo layout under ``<out>/criteo/`` and returns
    (and writes to ``oracle.json`` there) the oracle's scores; see the module's docstring.

    Args:
        out: the data folder (``paths.data_dir``); files go to ``<out>/criteo/``.
        rows: impressions in all.
        layout: ``kaggle`` (one ``train.txt``) or ``terabyte`` (``days`` files ``day_<d>``,
            the rows shared out evenly in order).
        days: files of the terabyte layout, 2 to 24.
        seed: picks the click model's weights and the rows.
        gzip: write ``.gz`` files (``train.txt.gz``, ``day_<d>.gz``).

    Returns:
        ``{"splits": {"train" | "val" | "test": {"range", "rows", "ctr"[, "auroc",
        "logloss"]}}, "all": {"rows", "stride", "ctr", "auroc", "logloss"}, ...}``: the
        oracle's scores on val and test, and on all rows (every ``stride``-th row past
        `ORACLE_ROWS`), with the settings.
    """
    if layout not in LAYOUTS:
        raise InputError(f"layout={layout!r} is not one of {list(LAYOUTS)}")
    if layout == "terabyte" and not 2 <= days <= TERABYTE_DAYS:
        raise InputError(f"days={days}: take 2 to {TERABYTE_DAYS} (the last is val and test)")
    least = 14 if layout == "kaggle" else 2 * days
    if rows < least:
        raise InputError(f"rows={rows}: take at least {least}, so that every split has rows")
    folder = Path(out) / "criteo"
    folder.mkdir(parents=True, exist_ok=True)
    per_file = _rows_per_file(rows, layout, days)
    suffix = ".gz" if gzip else ""
    names = (
        [f"train.txt{suffix}"] if layout == "kaggle" else [f"day_{d}{suffix}" for d in range(days)]
    )
    oracle = _Oracle(rows, split_bounds(per_file, layout))
    model = CriteoClickModel(seed)

    drawn, sample, used = 0, None, 0
    for name, count in zip(names, per_file, strict=True):
        part = folder / f"{name}.part"
        sink = pa.CompressedOutputStream(str(part), "gzip") if gzip else pa.OSFile(str(part), "wb")
        with sink:
            while count:
                if sample is None or used == len(sample.label):
                    n = min(CHUNK_ROWS, rows - drawn)
                    sample = model.sample(np.random.default_rng([seed, drawn // CHUNK_ROWS]), n)
                    oracle.add(sample, drawn)
                    drawn, used = drawn + n, 0
                take = min(count, len(sample.label) - used)
                rows_ = slice(used, used + take)
                write_rows(
                    sink,
                    sample.label[rows_],
                    sample.ints[rows_],
                    sample.sparse[rows_],
                    sample.ints_missing[rows_],
                )
                used += take
                count -= take
        os.replace(part, folder / name)

    result = {
        "generator": "recsys.data.criteo_synthetic",
        "seed": seed,
        "rows": rows,
        "layout": layout,
        "files": names,
        "rows_per_file": per_file,
        "target_ctr": TARGET_CTR,
        **oracle.scores(),
    }
    (folder / "oracle.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
