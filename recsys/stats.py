"""Statistics of a comparison over users (or rows): confidence intervals by bootstrap, paired
tests, Holm's correction across comparisons, and DeLong's test of two AUROCs on the same rows.

Every function takes one figure per user (a user's HR@10, NDCG@10, ...) in the same order for
the runs compared, so pairs are the same user; scipy does the resampling and the tests.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 10_000


class Interval(NamedTuple):
    """A mean with the bounds of its confidence interval."""

    mean: float
    low: float
    high: float


class Paired(NamedTuple):
    """A run against a baseline on the same users: the mean difference (run - baseline) with
    its interval, and the p-values of a paired t-test and a Wilcoxon signed-rank test."""

    difference: Interval
    t_pvalue: float
    wilcoxon_pvalue: float


class DeLong(NamedTuple):
    """Two AUROCs on the same rows, their difference (a - b) with its interval, and DeLong's
    two-sided p-value."""

    auroc_a: float
    auroc_b: float
    difference: Interval
    pvalue: float


def mean_interval(
    values: np.ndarray, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> Interval:
    """The mean of ``values`` and its percentile bootstrap interval (``resamples`` resamples of
    the users, seeded)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"need one figure per user, at least 2 users; got shape {values.shape}")
    mean = float(values.mean())
    if np.all(values == values[0]):  # every resample has this mean
        return Interval(mean, mean, mean)
    result = stats.bootstrap(
        (values,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return Interval(mean, float(ci.low), float(ci.high))


def paired(
    values: np.ndarray,
    baseline: np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Paired:
    """``values`` against ``baseline`` user by user. Users whose figures are equal carry no sign
    for Wilcoxon's test (scipy's ``zero_method="wilcox"`` leaves them out); when every user's
    figures are equal both p-values are 1."""
    values = np.asarray(values, dtype=np.float64)
    baseline = np.asarray(baseline, dtype=np.float64)
    if values.shape != baseline.shape:
        raise ValueError(
            f"{values.shape} figures against {baseline.shape} of the baseline: not the same users"
        )
    difference = mean_interval(values - baseline, confidence, resamples, seed)
    if np.all(values == baseline):
        return Paired(difference, 1.0, 1.0)
    t = stats.ttest_rel(values, baseline).pvalue
    if np.all(values - baseline == (values - baseline)[0]):  # a constant shift: no variance
        t = 0.0
    w = stats.wilcoxon(values, baseline, zero_method="wilcox").pvalue
    return Paired(difference, float(t), float(w))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of p-values of several comparisons (family-wise error):
    the i-th smallest of m is multiplied by m - i + 1, kept monotone, capped at 1."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted.tolist()


def delong(
    scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray, confidence: float = CONFIDENCE
) -> DeLong:
    """DeLong, DeLong and Clarke-Pearson (1988): the covariance of two AUROCs on the same rows
    from their structural components, computed with midranks (Sun and Xu 2014), and the
    z-test of their difference. Tied scores count half, as in the AUROC itself."""
    labels = np.asarray(labels).astype(bool)
    scores = np.stack([np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)])
    if scores.shape[1] != len(labels):
        raise ValueError(f"{scores.shape[1]} scores against {len(labels)} labels")
    m, n = int(labels.sum()), int((~labels).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs 2 positives and 2 negatives; got {m} and {n}")
    positives, negatives = scores[:, labels], scores[:, ~labels]
    tz = stats.rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
    tx = stats.rankdata(positives, axis=1)
    ty = stats.rankdata(negatives, axis=1)
    v10 = (tz[:, :m] - tx) / n  # per positive: the share of negatives it outranks
    v01 = 1.0 - (tz[:, m:] - ty) / m  # per negative: the share of positives that outrank it
    aurocs = v10.mean(axis=1)
    covariance = np.cov(v10) / m + np.cov(v01) / n
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    diff = float(aurocs[0] - aurocs[1])
    if variance <= 0:  # the same ranking of the rows: no difference to test
        return DeLong(float(aurocs[0]), float(aurocs[1]), Interval(diff, diff, diff), 1.0)
    sd = float(np.sqrt(variance))
    z = stats.norm.ppf(0.5 + confidence / 2)
    pvalue = float(2 * stats.norm.sf(abs(diff) / sd))
    return DeLong(
        float(aurocs[0]), float(aurocs[1]), Interval(diff, diff - z * sd, diff + z * sd), pvalue
    )
