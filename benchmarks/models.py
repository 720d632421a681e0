"""Train every model on every dataset and print the tables of the closing notes.

    python benchmarks/models.py table=pointwise [hydra overrides]   # test AUROC, throughput
    python benchmarks/models.py table=ranking [hydra overrides]     # leave-one-out HR/NDCG, ...
        [out=logs/benchmarks] [quick=true] [results=benchmarks/results]

Each cell is a full `recsys.train.run` (early stopping, test on the best checkpoint) composed
from the real config; ``ranking`` also evaluates the best checkpoint with full ranking for the
list metrics (coverage, novelty). Run folders go under ``<out>/<table>/``. ``quick=true``:
ml-100k only, one epoch a run (a smoke test). Results: ``<results>/models_<table>.json``
(`recsys.bench`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir

from recsys import bench, evaluate
from recsys.bench import Settings
from recsys.train import run

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = ["ncf", "hybrid", "dlrm"]
POINTWISE_DATA = ["movielens:100k", "movielens:1m", "books"]  # data option[:variant]
RANKING_DATA = ["movielens:100k", "movielens:1m"]
QUICK_DATA = ["movielens:100k"]
QUICK_OVERRIDES = ["trainer.max_epochs=1"]
LOO = [
    "data.feedback=implicit",
    "data.split.kind=leave_one_out",
    "data.ranking=sampled",  # the checkpoints are then selected by val/ndcg@10
]
TABLES = ("pointwise", "ranking")


@dataclass
class Options(Settings):
    table: str | None = None  # pointwise | ranking
    out: str = "logs/benchmarks"  # the run folders go under <out>/<table>/


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


def _train(data: str, model: str, out: Path, overrides: list[str]) -> tuple[dict, float]:
    name, _, variant = data.partition(":")
    cfg = _compose(
        "train",
        [
            f"data={name}",
            f"model={model}",
            "logger=csv",
            f"paths.output_dir={out}",
            "callbacks.progress_bar.refresh_rate=0",
            *([f"data.variant={variant}"] if variant else []),
            *overrides,
        ],
    )
    start = time.perf_counter()
    metrics = run(cfg)
    return metrics, time.perf_counter() - start


def _add(bench_run: bench.Benchmark, model: str, where: dict, figures: dict) -> None:
    system = "popularity" if model == "popularity" else "recsys"
    for metric, (value, unit) in figures.items():
        bench_run.add(
            system=system, model=model, metric=metric, unit=unit, value=value, settings=where
        )


def pointwise(bench_run: bench.Benchmark, datasets: list[str], overrides: list[str]) -> None:
    rows = []
    for data in datasets:
        for model in MODELS:
            out = Path(bench_run.settings.out) / "pointwise" / f"{data.replace(':', '-')}_{model}"
            m, wall = _train(data, model, out, overrides)
            rate = m.get("train/samples_per_sec")
            _add(
                bench_run,
                model,
                {"data": data},
                {
                    "test/auroc": (m["test/auroc"], ""),
                    "train/samples_per_sec": (rate, "samples/s"),
                    "wall_s": (wall, "s"),
                },
            )
            popularity = {"test/auroc": (m["popularity/test/auroc"], "")}
            _add(bench_run, "popularity", {"data": data, "beside": model}, popularity)
            rows.append(
                f"| {data} | {model} | {m['test/auroc']:.4f} | "
                f"{m['popularity/test/auroc']:.4f} | "
                f"{rate or float('nan'):,.0f} | {wall:.0f} |"
            )
    print("\n| data | model | test AUROC | popularity AUROC | train samples/s | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


def ranking(bench_run: bench.Benchmark, datasets: list[str], overrides: list[str]) -> None:
    rows = []
    for data in datasets:
        for model in MODELS:
            for loss in ("bce", "bpr"):
                name = f"{data.replace(':', '-')}_{model}_{loss}"
                out = Path(bench_run.settings.out) / "ranking" / name
                m, wall = _train(data, model, out, [*LOO, f"model.loss={loss}", *overrides])
                full = evaluate.run(
                    _compose(
                        "evaluate",
                        [
                            f"ckpt_path={m['best_model_path']}",
                            "ranking=full",
                            f"paths.output_dir={out}/evaluate_full",
                        ],
                    )
                )
                _add(
                    bench_run,
                    model,
                    {"data": data, "loss": loss},
                    {
                        "test/hr@10": (m["test/hr@10"], ""),
                        "test/ndcg@10": (m["test/ndcg@10"], ""),
                        "test/coverage@10": (full["test/coverage@10"], ""),
                        "test/novelty@10": (full["test/novelty@10"], ""),
                        "wall_s": (wall, "s"),
                    },
                )
                rows.append(
                    f"| {data} | {model} | {loss} | {m['test/hr@10']:.4f} | "
                    f"{m['test/ndcg@10']:.4f} | {full['test/coverage@10']:.4f} | "
                    f"{full['test/novelty@10']:.2f} | {wall:.0f} |"
                )
        popularity = {
            "test/hr@10": (m["popularity/test/hr@10"], ""),
            "test/ndcg@10": (m["popularity/test/ndcg@10"], ""),
            "test/coverage@10": (full["popularity/test/coverage@10"], ""),
            "test/novelty@10": (full["popularity/test/novelty@10"], ""),
        }
        _add(bench_run, "popularity", {"data": data}, popularity)
        rows.append(
            f"| {data} | popularity | - | {m['popularity/test/hr@10']:.4f} | "
            f"{m['popularity/test/ndcg@10']:.4f} | "
            f"{full['popularity/test/coverage@10']:.4f} | "
            f"{full['popularity/test/novelty@10']:.2f} | - |"
        )
    print("\n| data | model | loss | HR@10 | NDCG@10 | coverage@10 | novelty@10 | train+test s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


def main(bench_run: bench.Benchmark) -> None:
    opts = bench_run.settings
    if opts.table not in TABLES:
        raise ValueError(f"table={opts.table}: choose table=pointwise or table=ranking")
    bench_run.name = f"models_{opts.table}"
    datasets = {"pointwise": POINTWISE_DATA, "ranking": RANKING_DATA}[opts.table]
    overrides = bench_run.overrides
    if opts.quick:
        datasets, overrides = QUICK_DATA, [*QUICK_OVERRIDES, *overrides]
    {"pointwise": pointwise, "ranking": ranking}[opts.table](bench_run, datasets, overrides)
    bench_run.write()


if __name__ == "__main__":
    main(bench.start("models", Options, __doc__))
