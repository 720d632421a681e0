"""Scale: peak memory and training throughput against the number of interaction rows.

    python benchmarks/scale.py [quick=true] [rows=[1000000,10000000,50000000]]
        [models=[ncf,dlrm]] [out=<png>] [batch_size=4096] [cache_dir=<dir>]
        [results=benchmarks/results] [hydra overrides ...]

For each number of rows N, on ``data=synthetic`` with ``data.num_rows=N``:

- preprocessing, in a fresh process: ``prepare_data`` builds the processed folder (generate
  the rows, remove repeated (user, item) pairs, encode, write Parquet). Reported: its wall
  time and peak RSS.
- per model (``ncf``: NeuMF, ``dlrm``: DLRM, both with ``model.sparse_grad=true``: each
  step updates only the table rows of its batch, NeuMF's tables with RowSparseAdam, DLRM's with
  its Adagrad), in a fresh process: one training epoch on the platform's own path,
  `recsys.train.build` (``prepare_data`` finds the folder; ``setup`` loads the processed
  data as tensors and splits it; the model and the Trainer) and then
  ``trainer.fit`` with ``trainer.max_epochs=1``. Reported: the process's peak RSS (the
  kernel's maximum resident set size, read with ``wait4``: imports, about 0.5 GB, included),
  bytes per row (peak RSS over the rows kept after repeated pairs are removed), the peak when
  the data was set up (before the fit), the distinct users and items a step and the median
  time to build a batch (the first 20 training batches, built before the fit),
  ``train/samples_per_sec`` of the epoch (positives and their negatives, `SamplesPerSecond`),
  the fit's and the process's wall time.

Below the table, the marginal bytes per row between consecutive sizes (the slope of peak RSS
against rows: constant when memory is linear in rows) and the PNG ``out``: peak RSS and bytes
per row against rows, and samples/s against rows, log x axis, one line per model. Results:
``<results>/scale.json`` (`recsys.bench`), the figures of every run.

Settings, chosen to hold what training holds at scale: implicit feedback with 4 negatives per
positive, the NCF setup (``data.feedback=implicit``: every interaction is a positive, the
negatives are drawn per batch, so the sampler's set of training pairs is in memory); a random
80/10/10 split; ``data.batch_size`` positives a step (default 4096, as the ncf experiments:
20,480 samples); users N/100 and items N/1000, at least the generator's defaults (2,000 and
1,000): about MovieLens 20M's proportions (138K users and 27K items for 20M rows), so that
embedding tables grow with the data and most draws are distinct pairs. Validation is off
(``trainer.limit_val_batches=0``) and no checkpoint is written. What ``python train.py`` runs
after the fit (testing the best checkpoint and the popularity baseline) is not run: it is
evaluation, not training, and its cost depends on the evaluation protocol.

The processed data goes to a temporary folder, removed at the end, so preprocessing is
always measured; ``cache_dir=<dir>`` keeps it there and reuses what is there (preprocessing
then reports the time to find it). ``quick=true``: rows 100K and 1M, at most 20 training
batches a run (a smoke test: under two minutes on two cores). Other arguments are Hydra
overrides given to every run, e.g. ``data.num_negatives=1``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from recsys import bench
from recsys.bench import Settings

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Options(Settings):
    rows: list[int] = field(default_factory=lambda: [1_000_000, 10_000_000, 50_000_000])
    models: list[str] = field(default_factory=lambda: ["ncf", "dlrm"])
    # the plot, relative to the working directory (default: logs/benchmarks/scale.png, with
    # quick=true scale_quick.png)
    out: str | None = None
    batch_size: int = 4096
    cache_dir: str | None = None
    # internal: what a child process runs (prepare | fit) and where it writes its figures
    stage: str | None = None
    report: str | None = None


QUICK = {"rows": [100_000, 1_000_000]}
# row-sparse table updates, as a model with millions of rows needs: each step moves the
# batch's rows only (NeuMF's tables with RowSparseAdam, DLRM's with its own Adagrad)
MODELS = {
    "ncf": [
        "model.sparse_grad=true",
        "model.sparse_optimizer="
        "{_target_: recsys.lit.optim.RowSparseAdam, _partial_: true, lr: 0.001}",
    ],
    "dlrm": ["model.sparse_grad=true"],
}
QUICK_OVERRIDES = ["+trainer.limit_train_batches=20"]
LABELS = {"ncf": "NeuMF", "dlrm": "DLRM", "preprocess": "preprocessing"}
COLORS = {"preprocess": "tab:gray", "ncf": "tab:blue", "dlrm": "tab:orange"}
TARGET = 120  # bytes per row at 50M rows (issue 11)


def sizes(rows: int) -> dict[str, int]:
    """Users and items of the synthetic data with ``rows`` rows."""
    return {"num_users": max(2_000, rows // 100), "num_items": max(1_000, rows // 1_000)}


def data_overrides(rows: int, args: Options) -> list[str]:
    s = sizes(rows)
    return [
        "data=synthetic",
        f"data.num_rows={rows}",
        f"data.num_users={s['num_users']}",
        f"data.num_items={s['num_items']}",
        "data.feedback=implicit",
        f"data.batch_size={args.batch_size}",
    ]


FIT = list(bench.ONE_EPOCH)


# --- the child processes ---------------------------------------------------------------------
def vm_hwm_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def batch_figures(dm, n: int = 20) -> dict:
    """What the first ``n`` training batches hold and cost: the distinct users and items a
    step (the table rows that NeuMF's first layer and the tables' row-sparse updates run over),
    and the median time to build one batch (negative sampling included)."""
    loader = dm.train_dataloader()
    n = min(n, len(loader))
    batches = iter(loader)
    seconds, users, items = [], [], []
    for _ in range(n):
        start = time.perf_counter()
        batch = next(batches)
        seconds.append(time.perf_counter() - start)
        users.append(len(batch.ids("user_id").unique()))
        items.append(len(batch.ids("item_id").unique()))
    return {
        "users_per_step": sum(users) / n,
        "items_per_step": sum(items) / n,
        "batch_ms": statistics.median(seconds) * 1e3,
    }


def child(stage: str, overrides: list[str], report: Path) -> None:
    """Run one stage in this process and write its figures to ``report`` (JSON)."""
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from recsys.callbacks import SamplesPerSecond
    from recsys.data.store import read_meta
    from recsys.train import build

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides)
    figures: dict = {}
    if stage == "prepare":
        dm = instantiate(cfg.data)
        figures["built"] = not dm.processed_dir.exists()
        dm.prepare_data()
    elif stage == "fit":
        if cfg.get("seed") is not None:
            L.seed_everything(cfg.seed, workers=True)
        dm, model, trainer = build(cfg)
        figures["setup_peak_mb"] = vm_hwm_mb()
        figures.update(batch_figures(dm))
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        figures["fit_s"] = time.perf_counter() - start
        speed = next(c for c in trainer.callbacks if isinstance(c, SamplesPerSecond))
        figures["samples_per_sec"] = speed.overall
        figures["train_rows"] = len(dm.rows["train"])
    else:
        raise ValueError(f"stage={stage!r} is not prepare or fit")
    figures["kept_rows"] = read_meta(dm.processed_dir)["num_interactions"]
    report.write_text(json.dumps(figures))


# --- the parent ----------------------------------------------------------------------------
def measure(stage: str, overrides: list[str], folder: Path) -> dict:
    """Run ``stage`` in a fresh process; its figures, wall time and peak RSS (MB)."""
    return bench.measure_stage(__file__, stage, overrides, folder)


def run_all(args: Options, extra: list[str], tmp: Path) -> list[dict]:
    cache = Path(args.cache_dir).resolve() if args.cache_dir else tmp / "cache"
    results = []
    for rows in args.rows:
        folder = tmp / f"rows-{rows}"
        base = [*data_overrides(rows, args), f"paths.cache_dir={cache}"]
        for name in ["preprocess", *args.models]:
            run_dir = folder / name
            run_dir.mkdir(parents=True)
            overrides = [*base, f"paths.output_dir={run_dir}"]
            if name == "preprocess":
                figures = measure("prepare", [*overrides, *extra], run_dir)
            else:
                model = [f"model={name}", *MODELS.get(name, [])]
                figures = measure("fit", [*overrides, *model, *FIT, *extra], run_dir)
            figures.update({"rows": rows, "stage": name, **sizes(rows)})
            figures["bytes_per_row"] = figures["peak_mb"] * 2**20 / figures["kept_rows"]
            results.append(figures)
            speed = figures.get("samples_per_sec")
            print(
                f"{rows:,} rows, {LABELS.get(name, name)}: peak {figures['peak_mb']:,.0f} MB "
                f"({figures['bytes_per_row']:.0f} B/row), {figures['wall_s']:.0f} s"
                + ("" if speed is None else f", {speed:,.0f} samples/s"),
                flush=True,
            )
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| rows | kept rows | users | items | stage | peak RSS MB | B/row | setup peak MB "
        "| users / items a step | batch ms | samples/s | fit s | wall s |",
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]

    def num(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if r.get(key) is not None else "-"

    for r in results:
        stage = LABELS.get(r["stage"], r["stage"]) + ("" if r.get("built", True) else " (cached)")
        per_step = (
            f"{r['users_per_step']:,.0f} / {r['items_per_step']:,.0f}"
            if "users_per_step" in r
            else "-"
        )
        lines.append(
            f"| {r['rows']:,} | {r['kept_rows']:,} | {r['num_users']:,} | {r['num_items']:,} "
            f"| {stage} | {r['peak_mb']:,.0f} | {r['bytes_per_row']:.0f} "
            f"| {num(r, 'setup_peak_mb', ',.0f')} | {per_step} | {num(r, 'batch_ms', '.1f')} "
            f"| {num(r, 'samples_per_sec', ',.0f')} "
            f"| {num(r, 'fit_s', '.0f')} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def measured(results: list[dict], stage: str) -> list[dict]:
    """The runs of ``stage`` by rows, without preprocessing that found its folder cached (it
    measured nothing)."""
    runs = [r for r in results if r["stage"] == stage and r.get("built", True)]
    return sorted(runs, key=lambda r: r["rows"])


def slopes(results: list[dict]) -> list[tuple[str, dict, dict, float]]:
    """Marginal bytes per kept row between consecutive sizes, per stage: (stage, the smaller
    run, the larger run, bytes per added row)."""
    out = []
    for stage in dict.fromkeys(r["stage"] for r in results):
        runs = measured(results, stage)
        for a, b in zip(runs, runs[1:], strict=False):
            slope = (b["peak_mb"] - a["peak_mb"]) * 2**20 / (b["kept_rows"] - a["kept_rows"])
            out.append((stage, a, b, slope))
    return out


def plot(results: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for stage in dict.fromkeys(r["stage"] for r in results):
        runs = measured(results, stage)
        x = [r["rows"] for r in runs]
        style = {
            "marker": "o",
            "label": LABELS.get(stage, stage),
            "color": COLORS.get(stage),
            "linestyle": ":" if stage == "preprocess" else "-",
        }
        axes[0].plot(x, [r["peak_mb"] / 1024 for r in runs], **style)
        axes[1].plot(x, [r["bytes_per_row"] for r in runs], **style)
        if stage != "preprocess":
            axes[2].plot(x, [r["samples_per_sec"] for r in runs], **style)
    xs = sorted({r["rows"] for r in results})
    kept = {r["rows"]: r["kept_rows"] for r in results}
    axes[0].plot(xs, [TARGET * kept[x] / 2**30 for x in xs], "k--", lw=1, label=f"{TARGET} B/row")
    axes[1].axhline(TARGET, color="k", ls="--", lw=1, label=f"target {TARGET} B/row")
    top = max(TARGET, *(r["bytes_per_row"] for r in results if r["rows"] == xs[-1]))
    axes[0].set(ylabel="peak RSS (GiB)", yscale="log", title="Peak resident memory")
    axes[0].yaxis.set_major_formatter(ScalarFormatter())
    axes[1].set(
        ylabel="peak RSS / kept rows (bytes)",
        title="Bytes per row",
        yscale="log",
        ylim=(top / 20, top * 30),
    )
    axes[1].yaxis.set_major_formatter(ScalarFormatter())
    fastest = max((r.get("samples_per_sec") or 0 for r in results), default=0)
    axes[2].set(
        ylabel="training samples/s",
        title="Throughput (one epoch)",
        ylim=(0, fastest * 1.3 or None),
    )
    for ax in axes:
        ax.set(xscale="log", xlabel="interaction rows (data.num_rows)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


FIGURES = {  # a run's figures that become rows, and their units
    "peak_mb": "MB",
    "bytes_per_row": "B",
    "kept_rows": "",
    "setup_peak_mb": "MB",
    "users_per_step": "",
    "items_per_step": "",
    "batch_ms": "ms",
    "samples_per_sec": "samples/s",
    "fit_s": "s",
    "wall_s": "s",
}


def add_rows(run: bench.Benchmark, results: list[dict]) -> None:
    """Each run's figures as rows, and the marginal bytes per row between sizes."""
    for r in results:
        where = {k: r[k] for k in ("rows", "num_users", "num_items")}
        where |= {"batch_size": run.settings.batch_size, "cached": not r.get("built", True)}
        for metric, unit in FIGURES.items():
            if r.get(metric) is not None:
                run.add(
                    system="recsys",
                    model=LABELS.get(r["stage"], r["stage"]),
                    metric=metric,
                    unit=unit,
                    value=r[metric],
                    settings=where,
                )
    for stage, a, b, slope in slopes(results):
        run.add(
            system="recsys",
            model=LABELS.get(stage, stage),
            metric="marginal_bytes_per_row",
            unit="B",
            value=slope,
            settings={"from_rows": a["rows"], "to_rows": b["rows"]},
        )


def main(run: bench.Benchmark) -> None:
    args, extra = run.settings, run.overrides
    if args.stage is not None:
        child(args.stage, extra, Path(args.report))
        return
    if args.quick:
        extra = [*QUICK_OVERRIDES, *extra]
    models = {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")}
    if unknown := set(args.models) - models:
        raise ValueError(
            f"models={args.models}: unknown {sorted(unknown)}; choose among {sorted(models)}"
        )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        results = run_all(args, extra, Path(tmp))
    add_rows(run, results)
    title = (
        f"Synthetic data, users rows/100, items rows/1000; implicit feedback, "
        f"batch {args.batch_size} positives; one process per run"
    )
    print(f"\n{title} (peak RSS: the whole process, imports included)\n")
    print(table(results))
    print()
    for stage, a, b, slope in slopes(results):
        print(
            f"{LABELS.get(stage, stage)}: {slope:.0f} B per added row from {a['rows']:,} to "
            f"{b['rows']:,} rows"
        )
    if args.out is not None:
        out = Path(args.out)
    else:
        out = Path("logs/benchmarks") / ("scale_quick.png" if args.quick else "scale.png")
    plot(results, out, title)
    print(f"\nplot: {out}; whole command: {time.perf_counter() - start:.0f} s")
    run.write()


if __name__ == "__main__":
    main(bench.start("scale", Options, __doc__, quick=QUICK))
