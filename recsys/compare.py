"""Compare finished runs: a table of what differs and their metrics, and a PNG chart.

    python -m recsys.compare logs/train/multiruns/<sweep> [more run or sweep dirs]
        [--metric test/auroc] [--columns test/auroc test/hr@10] [--output chart.png]

Every folder below the given ones that holds a ``metrics.json`` is a run; its Hydra overrides
(``.hydra/overrides.yaml``) say how it was launched. The table shows one row per run: the
overrides whose values differ between the runs, then the metrics. For users without W&B.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import pandas as pd
import yaml

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_COLUMNS = [
    "test/auroc",
    "test/hr@10",
    "test/ndcg@10",
    "val/auroc",
    "val/ndcg@10",
    "popularity/test/auroc",
    "train/samples_per_sec",
]


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


def chart(runs: pd.DataFrame, metric: str, output: Path) -> Path:
    """Horizontal bar chart of ``metric`` per run, labelled by the differing overrides."""
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
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.5))
    ax.barh(labels, shown[metric])
    for y, v in enumerate(shown[metric]):
        ax.text(v, y, f" {v:.4f}", va="center")
    ax.set_xlabel(metric)
    ax.set_xlim(0, shown[metric].max() * 1.15)
    ax.set_title(f"{metric} by run")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recsys.compare", description=__doc__)
    parser.add_argument("paths", nargs="+", type=Path, help="run or sweep folders")
    parser.add_argument("--metric", default="test/auroc", help="metric of the chart")
    parser.add_argument("--columns", nargs="+", default=DEFAULT_COLUMNS, help="table metrics")
    parser.add_argument("--output", type=Path, help="PNG path (default: in the first folder)")
    args = parser.parse_args(argv)
    runs = load_runs(args.paths)
    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(
            table(runs, args.columns)
            .sort_values(args.metric, ascending=False, na_position="last")
            .to_string(index=False)
        )
    name = "compare_" + args.metric.replace("/", "_").replace("@", "at") + ".png"
    print(f"chart: {chart(runs, args.metric, args.output or args.paths[0] / name)}")


if __name__ == "__main__":
    main()
