"""The statistics of comparisons (`recsys.stats`) against scipy and independent computations
on known data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps
from torchmetrics.functional.classification import binary_auroc

from recsys import stats


def test_the_interval_holds_the_mean_is_seeded_and_narrows_with_users():
    rng = np.random.default_rng(1)
    small, large = rng.binomial(1, 0.7, 300), rng.binomial(1, 0.7, 30_000)
    a = stats.mean_interval(small, seed=3)
    assert a == stats.mean_interval(small, seed=3)
    assert a.low < a.mean < a.high and a.mean == pytest.approx(small.mean())
    b = stats.mean_interval(large, resamples=2000)
    assert b.high - b.low < (a.high - a.low) / 5
    # the normal approximation of a binomial mean's interval, an independent computation
    se = np.sqrt(small.mean() * (1 - small.mean()) / len(small))
    assert a.high - a.low == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_identical_runs_differ_by_nothing_with_p_one():
    values = np.random.default_rng(0).random(500)
    result = stats.paired(values, values.copy())
    assert result.difference == (0.0, 0.0, 0.0)
    assert result.t_pvalue == 1.0 and result.wilcoxon_pvalue == 1.0


def test_paired_tests_are_scipys_on_the_same_users():
    rng = np.random.default_rng(2)
    baseline = rng.binomial(1, 0.60, 2000).astype(float)
    values = np.where(rng.random(2000) < 0.1, 1.0, baseline)  # better for some users
    result = stats.paired(values, baseline)
    assert result.t_pvalue == pytest.approx(sps.ttest_rel(values, baseline).pvalue)
    assert result.wilcoxon_pvalue == pytest.approx(sps.wilcoxon(values, baseline).pvalue)
    assert result.t_pvalue < 1e-6
    diff = result.difference
    assert diff.low < diff.mean < diff.high and diff.mean == pytest.approx(
        (values - baseline).mean()
    )
    with pytest.raises(ValueError, match="not the same users"):
        stats.paired(values, baseline[:-1])


def test_holm_adjusts_as_the_textbook_example():
    # Holm (1979) on p = 0.01, 0.04, 0.03, 0.005: sorted 0.005 0.01 0.03 0.04 times 4 3 2 1
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0]


def _naive_delong(a, b, labels):
    """DeLong's structural components by the O(m n) kernel, ties counting half."""
    out = []
    for s in (a, b):
        pos, neg = s[labels], s[~labels]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        out.append((psi.mean(axis=1), psi.mean(axis=0), psi.mean()))
    (v10a, v01a, auca), (v10b, v01b, aucb) = out
    m, n = len(v10a), len(v01a)
    var = (
        np.var(v10a - v10b, ddof=1) / m + np.var(v01a - v01b, ddof=1) / n
    )  # var(A - B) from the components
    return auca, aucb, var


def test_delong_matches_the_kernel_definition_and_torchmetrics():
    rng = np.random.default_rng(4)
    labels = rng.random(400) < 0.3
    a = np.round(labels * 0.8 + rng.normal(size=400), 1)  # rounded: ties inside and across
    b = np.round(labels * 0.4 + rng.normal(size=400), 1)
    result = stats.delong(a, b, labels)
    auca, aucb, var = _naive_delong(a, b, labels)
    assert result.auroc_a == pytest.approx(auca) and result.auroc_b == pytest.approx(aucb)
    target = torch.from_numpy(labels.astype(np.int64))
    assert result.auroc_a == pytest.approx(float(binary_auroc(torch.from_numpy(a), target)))
    z = (auca - aucb) / np.sqrt(var)
    assert result.pvalue == pytest.approx(2 * sps.norm.sf(abs(z)))
    assert result.difference.low < result.difference.mean < result.difference.high
    same = stats.delong(a, a.copy(), labels)
    assert same.pvalue == 1.0 and same.difference.mean == 0.0
