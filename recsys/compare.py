"""Compare finished runs: their metrics with confidence intervals, each against a baseline run
with paired tests over the same users, and a chart.

    python -m recsys.compare runs=[logs/train/multiruns/<sweep>,<run>] [baseline=<run>]
        [metrics=[test/hr@10,test/auroc]] [unpaired=true]          (conf/compare.yaml)

Every folder below ``runs`` that holds a ``metrics.json`` is a run; its Hydra overrides say how
it was launched. Where a run wrote its test figures per query and per row
(`recsys.runs.write_test_results`), each metric gets its mean over users with a bootstrap
interval, and each run against the baseline (``baseline``, default the first run) the paired
difference with its interval and the p-values of a paired t-test and a Wilcoxon signed-rank
test over users (DeLong's test for AUROC, on the same rows), Holm-corrected across the runs
compared (`recsys.stats`). Runs are paired only when they were tested on the same processed
data, split and protocol (candidates included); otherwise the comparison is refused with the
reason, or, with ``unpaired=true``, made with Welch's t-test and the Mann-Whitney U test.
Runs that differ only in their seed are summarised over seeds: mean, standard deviation and a
t interval. Writes the tables as JSON (``output``) and a bar chart with the intervals
(``chart``).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import hydra
import matplotlib
import numpy as np
import pandas as pd
import yaml
from omegaconf import DictConfig
from scipy import stats as sps

from recsys import stats
from recsys.errors import InputError, MissingInputError, exit_on_user_error
from recsys.runs import QUERIES_FILE, ROWS_FILE, read_test_results

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_COLUMNS = [
    "test/auroc",
    "test/hr@10",
    "test/ndcg@10",
    "val/auroc",
    "val/ndcg@10",
    "popularity/test/auroc",
    "train/samples_per_sec",
]
# metrics computed from the per-row file rather than per query
ROW_METRICS = ("auroc", "logloss", "accuracy")


def load_runs(paths: list[Path]) -> pd.DataFrame:
    """One row per run below ``paths``: ``run`` (folder), the overrides, the metrics."""
    rows = []
    for root in paths:
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist; pass run or sweep folders")
        for metrics_file in sorted(root.rglob("metrics.json")):
            run_dir = metrics_file.parent
            row = {"run": str(run_dir)}
            overrides = run_dir / ".hydra" / "overrides.yaml"
            if overrides.is_file():
                for item in yaml.safe_load(overrides.read_text()) or []:
                    key, _, value = item.partition("=")
                    row[f"+{key.lstrip('+~')}"] = value
            row.update(json.loads(metrics_file.read_text()))
            rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no metrics.json below {', '.join(map(str, paths))}")
    runs = pd.DataFrame(rows)
    # an override that a run was launched without: its default, named so (a label, not NaN)
    return runs.fillna({c: "(default)" for c in runs.columns if c.startswith("+")})


def table(runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The overrides that differ between runs (named without the leading ``+``) and the
    metrics in ``columns`` that any run has."""
    overrides = [c for c in runs if c.startswith("+") and runs[c].astype(str).nunique() > 1]
    metrics = [c for c in columns if c in runs]
    out = runs[["run", *overrides, *metrics]].rename(columns=lambda c: c.lstrip("+"))
    return out


def sorted_results(path: Path) -> tuple[pd.DataFrame, dict]:
    """A file of `recsys.runs.write_test_results` in the order of its keys (user, item and, for
    rows, label), so that runs whose ranks wrote them in another order pair."""
    frame, about = read_test_results(path)
    keys = ["user", "item", "label"] if path.name == ROWS_FILE else ["user", "item"]
    return frame.sort_values(keys, kind="stable", ignore_index=True), about


def per_user_values(
    run: str, metric: str, read: Callable[[Path], tuple] = sorted_results
) -> tuple[np.ndarray, pd.DataFrame, dict] | None:
    """A run's figure of ``metric`` (``test/hr@10``, ``test/auroc``, ...) per query or per
    row, the keys that pair them with another run's, and what they were measured on; None
    when the run wrote no such file. ``read``: how a file is read (`sorted_results`, or a
    cache of it)."""
    name = metric.removeprefix("test/")
    per_row = name in ROW_METRICS
    path = Path(run) / (ROWS_FILE if per_row else QUERIES_FILE)
    if not path.is_file():
        return None
    frame, about = read(path)
    keys = ["user", "item", "label"] if per_row else ["user", "item"]
    if per_row:
        logits, labels = frame["logit"].to_numpy(), frame["label"].to_numpy()
        if name == "logloss":
            values = np.logaddexp(0.0, -logits) * labels + np.logaddexp(0.0, logits) * (1 - labels)
        elif name == "accuracy":
            values = ((logits >= 0) == (labels > 0)).astype(np.float64)
        else:  # AUROC has no per-row value: the rows go to DeLong's test
            values = logits
        return values, frame[keys], about
    if name not in frame:
        return None
    return frame[name].to_numpy(np.float64), frame[keys], about


def pairing_problem(base: tuple, other: tuple) -> str | None:
    """Why two runs' per-user figures cannot be paired, or None."""
    _, base_keys, base_about = base
    _, keys, about = other
    for part in ("data", "protocol"):
        if base_about.get(part) != about.get(part):
            theirs, ours = base_about.get(part), about.get(part)
            return f"they were tested on other {part}: {theirs} against {ours}"
    if len(base_keys) != len(keys) or not base_keys.reset_index(drop=True).equals(
        keys.reset_index(drop=True)
    ):
        return "their test rows or queries differ"
    return None


def statistics(
    runs: pd.DataFrame,
    metrics: list[str],
    baseline: str | None = None,
    unpaired: bool = False,
    confidence: float = stats.CONFIDENCE,
    resamples: int = stats.RESAMPLES,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (metric, run): the metric as reported, its mean over users with a bootstrap
    interval, and against ``baseline`` (a run folder; default the first run) the difference
    with its interval and the p-values (raw and Holm-corrected across the runs compared).

    Raises:
        InputError: runs that cannot be paired with the baseline, unless ``unpaired``.
    """
    names = runs["run"].tolist()
    base = baseline or names[0]
    if base not in names:
        raise InputError(f"baseline={base} is not one of the compared runs: {names}")
    out = []
    read = functools.cache(sorted_results)  # each file read once, whatever the metrics
    for metric in metrics:
        name = metric.removeprefix("test/")
        values = {run: per_user_values(run, metric, read) for run in names}
        rows = []
        for run in names:
            row = {"metric": metric, "run": run, "reported": _reported(runs, run, metric)}
            mine = values[run]
            if mine is not None and name != "auroc":
                ci = stats.mean_interval(mine[0], confidence, resamples, seed)
                row.update(mean=ci.mean, low=ci.low, high=ci.high)
            if run != base and mine is not None and values[base] is not None:
                row.update(
                    _against(values[base], mine, name, unpaired, run, confidence, resamples, seed)
                )
            rows.append(row)
        tested = [r for r in rows if "p_value" in r]
        for test in ("p_value", "p_wilcoxon"):
            present = [r for r in tested if r.get(test) is not None]
            for r, p in zip(present, stats.holm([r[test] for r in present]), strict=True):
                r[f"{test}_holm"] = p
        out += rows
    return pd.DataFrame(out)


def _reported(runs: pd.DataFrame, run: str, metric: str):
    value = runs.loc[runs["run"] == run, metric] if metric in runs else None
    return None if value is None or value.isna().all() else float(value.iloc[0])


def _against(base, other, name, unpaired, run, confidence, resamples, seed) -> dict:
    """The difference of ``other`` against ``base`` and its tests."""
    problem = pairing_problem(base, other)
    if problem is not None and not unpaired:
        raise InputError(
            f"{run} cannot be compared user by user with the baseline: {problem}. Compare "
            "runs tested on the same data, split and candidates, or pass unpaired=true"
        )
    if name == "auroc":
        if problem is not None:
            return {"test": "none (AUROC of other rows: no paired test)"}
        result = stats.delong(other[0], base[0], base[1]["label"].to_numpy(), confidence)
        return {
            "difference": result.difference.mean,
            "difference_low": result.difference.low,
            "difference_high": result.difference.high,
            "p_value": result.pvalue,
            "test": "DeLong",
        }
    if problem is None:
        result = stats.paired(other[0], base[0], confidence, resamples, seed)
        return {
            "difference": result.difference.mean,
            "difference_low": result.difference.low,
            "difference_high": result.difference.high,
            "p_value": result.t_pvalue,
            "p_wilcoxon": result.wilcoxon_pvalue,
            "test": "paired t, Wilcoxon",
        }
    return {
        "difference": float(other[0].mean() - base[0].mean()),
        "p_value": float(sps.ttest_ind(other[0], base[0], equal_var=False).pvalue),
        "p_wilcoxon": float(sps.mannwhitneyu(other[0], base[0]).pvalue),
        "test": "unpaired: Welch t, Mann-Whitney U",
    }


def over_seeds(runs: pd.DataFrame, metrics: list[str], confidence: float) -> pd.DataFrame:
    """Runs that differ only in a seed (an override whose key ends in ``seed``), grouped:
    each metric's mean, standard deviation and t interval over the seeds."""
    keys = [c for c in runs if c.startswith("+") and not c.endswith("seed")]
    seeds = [c for c in runs if c.startswith("+") and c.endswith("seed")]
    if not seeds:
        return pd.DataFrame()
    out = []
    for setting, group in runs.groupby(keys, dropna=False) if keys else [((), runs)]:
        if len(group) < 2:
            continue
        for metric in [m for m in metrics if m in group]:
            values = group[metric].dropna().to_numpy(np.float64)
            if len(values) < 2:
                continue
            mean, sd = values.mean(), values.std(ddof=1)
            half = sps.t.ppf(0.5 + confidence / 2, len(values) - 1) * sd / np.sqrt(len(values))
            label = dict(zip([k.lstrip("+") for k in keys], np.atleast_1d(setting), strict=True))
            out.append(
                {
                    **label,
                    "metric": metric,
                    "seeds": len(values),
                    "mean": mean,
                    "sd": sd,
                    "low": mean - half,
                    "high": mean + half,
                }
            )
    return pd.DataFrame(out)


def chart(
    runs: pd.DataFrame, metric: str, output: Path, intervals: pd.DataFrame | None = None
) -> Path:
    """Horizontal bar chart of ``metric`` per run, labelled by the differing overrides, with
    each run's interval where ``intervals`` (`statistics`) has one."""
    if metric not in runs:
        raise ValueError(
            f"no run has metric {metric!r}; metrics: {sorted(c for c in runs if '/' in c)}"
        )
    shown = table(runs, [metric]).dropna(subset=[metric]).sort_values(metric)
    label_cols = [c for c in shown if c not in ("run", metric)]
    labels = (
        shown[label_cols].astype(str).agg(" ".join, axis=1)
        if label_cols
        else shown["run"].map(lambda r: Path(r).name)
    )
    errors = None
    if intervals is not None and "low" in intervals:
        rows = intervals[intervals["metric"] == metric].set_index("run")
        low = shown["run"].map(rows["low"]) if len(rows) else None
        high = shown["run"].map(rows["high"]) if len(rows) else None
        if low is not None and low.notna().all():
            errors = np.vstack([shown[metric] - low, high - shown[metric]]).clip(min=0)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.5))
    ax.barh(labels, shown[metric], xerr=errors, capsize=3)
    for y, v in enumerate(shown[metric]):
        ax.text(v, y, f" {v:.4f}", va="bottom")
    ax.set_xlabel(metric + (" (bars: 95% interval over users)" if errors is not None else ""))
    ax.set_xlim(0, shown[metric].max() * 1.2)
    ax.set_title(f"{metric} by run")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def run(cfg: DictConfig) -> dict:
    """Print and write the comparison of ``cfg.runs`` (see the module's docstring)."""
    if not cfg.runs:
        raise InputError("pass runs=[<run or sweep folders>]")
    try:
        runs = load_runs([Path(p) for p in cfg.runs])
    except FileNotFoundError as e:
        raise MissingInputError(str(e)) from None
    metrics = list(cfg.metrics)
    result = statistics(
        runs, metrics, cfg.baseline, cfg.unpaired, cfg.confidence, cfg.resamples, cfg.seed
    )
    seeds = over_seeds(runs, metrics, cfg.confidence)
    base = cfg.baseline or runs["run"].iloc[0]
    with pd.option_context("display.max_columns", None, "display.width", 200):
        log.info("runs\n%s", table(runs, metrics).to_string(index=False))
        log.info(
            "against the baseline %s\n%s",
            base,
            result.to_string(index=False),
        )
        if len(seeds):
            log.info("over seeds\n%s", seeds.to_string(index=False))
    document = {
        "baseline": base,
        "runs": json.loads(table(runs, metrics).to_json(orient="records")),
        "statistics": json.loads(result.to_json(orient="records")),
        "over_seeds": json.loads(seeds.to_json(orient="records")),
    }
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=1))
    picture = chart(runs, cfg.chart_metric or metrics[0], Path(cfg.chart), result)
    log.info("wrote %s and %s", output, picture)
    return document


@hydra.main(version_base="1.3", config_path="../conf", config_name="compare")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
