"""The comparison of the NCF paper (He et al. 2017), reproduced on this platform, quickly.

    python benchmarks/ncf_table.py [quick=true] [seeds=[42,1,2]] [out=logs/benchmarks/ncf_table]
        [results=benchmarks/results] [hydra overrides]

Protocol (``experiment=ncf_protocol``, He et al. 2017, Section 4.1): implicit feedback; each
user's latest interaction is the test item and one of the others, drawn at random, the
validation item, each ranked against 99 sampled items the user never rated; HR@10 and NDCG@10
on the test items, of the checkpoint with the best val/ndcg@10. The shared ``data/ml-1m`` is a
subset of MovieLens 1M (487,650 of 1,000,209 ratings, users 1-2,999), so the figures are not
the paper's.

Rows, each one `recsys.train.run` of ``experiment=ncf_<model>`` (fit with early stopping,
test of the best checkpoint, the popularity baseline beside it):

- popularity: items ranked by their training interactions (``popularity/test/*`` of the
  NeuMF run; it trains nothing, so it has no wall time of its own);
- MF: dot product plus biases, L2, 8 negatives (Rendle et al. 2020);
- GMF, MLP, NeuMF without pretraining;
- NeuMF pretrained: initialised from the best checkpoints of this table's GMF and MLP runs
  (``model.pretrained``); its wall time is its own run's, and ``+ sources`` adds theirs;
- EASE and ItemKNN (``experiment=ncf_ease``, ``ncf_itemknn``), fitted in closed form, each
  tuned like the others on validation: one run per setting of `GRIDS`, the one with the best
  val/ndcg@10 kept (its setting is a row of the results; the wall time is the grid's).

Beside each model's HR@10 and NDCG@10, the p-value of a paired t-test over the test users of
its HR@10 against NeuMF's (`recsys.stats.paired`, on the runs' ``test_queries.parquet``).

NeuMF runs first, so its time to quality counts from the process's start
(`recsys.bench.process_start`: the interpreter's start-up and the imports of torch, Lightning
and recsys included): the seconds from the start until the end of the first validation after
which the weights of that moment reach ``TARGET_HR`` in the table's own figure, HR@10 on the
test items (data loading and the evaluations included). `ValidationClock`, a callback added to
that run, appends the wall clock, ``val/hr@10`` and the current weights' test HR@10 after each
validation to ``validation_clock.jsonl`` in the run folder; the figures are read from there
(``never`` when none reached it). The test items only time the run: the checkpoint is still
chosen by validation. The time to ``val/hr@10`` is printed beside it; under the paper's
validation rows (one random interaction per user, ``data.split.val_row=random``) validation
runs well above test, so that figure says little by itself.

Options: ``quick=true`` (ml-100k, one epoch per run: a smoke test), ``out`` (the folder of the
run folders), ``seeds`` (two or more: the whole table once per ``seed``, each in a fresh
process of this script, so that each seed's time to quality counts from its own process's
start, its runs in ``<out>/seed_<seed>``; then each model's test HR@10 and NDCG@10 over them:
mean, sample standard deviation and each seed's; a seed draws the validation rows, the sampled
candidates, the negatives and the initial weights, so the spread is that of the protocol and
the training together); anything else is a Hydra override given to every run, e.g.
``trainer.max_epochs=3``. Results (`recsys.bench`): ``<results>/ncf_table.json``, with
``seeds`` ``ncf_table_seeds.json``: each seed's rows and the means over the seeds.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback

from recsys import bench, stats
from recsys.bench import Settings
from recsys.metrics import RankingMetrics
from recsys.runs import QUERIES_FILE, read_test_results
from recsys.train import run

CONF = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class Options(Settings):
    out: str = "logs/benchmarks/ncf_table"  # the run folders
    seeds: list[int] | None = None


QUICK = ["data.variant=100k", "trainer.max_epochs=1"]
TARGET_HR = 0.70
CLOCK_FILE = "validation_clock.jsonl"
SUBSET = "a subset: 487,650 of 1,000,209 ratings, users 1-2,999"
LABELS = {
    "mf": "MF (Rendle et al. 2020)",
    "gmf": "GMF",
    "mlp": "MLP",
    "neumf": "NeuMF",
    "neumf_pretrained": "NeuMF pretrained",
    "ease": "EASE (Steck 2019)",
    "itemknn": "ItemKNN",
}
# the settings each closed-form model is tuned over, on validation
GRIDS = {
    "ease": {"model.l2_reg": [100.0, 500.0, 2000.0]},
    "itemknn": {"model.k": [20, 100, 400]},
}
POPULARITY = "popularity"
METRICS = ("test/hr@10", "test/ndcg@10")


class ValidationClock(Callback):
    """Appends ``{"time": <time.time()>, "epoch": e, "val/hr@10": x, "test/hr@10": y}`` to
    ``path`` at the end of every validation (sanity checks excluded): ``y`` is the HR@10 of
    the weights of that moment on the test queries, timed before it is computed."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        hr = trainer.callback_metrics.get("val/hr@10")
        entry = {"time": time.time(), "epoch": trainer.current_epoch}
        entry["val/hr@10"] = None if hr is None else float(hr)
        entry["test/hr@10"] = hit_rate(
            pl_module, trainer.datamodule.protocol.ranking_loader("test")
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")


def compose_row(name: str, out: Path, overrides: list[str]):
    """The config of one row's run: ``experiment=ncf_<name>`` into ``out``."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(
            "train",
            [
                f"experiment=ncf_{name}",
                "logger=csv",
                f"paths.output_dir={out}",
                "callbacks.progress_bar.refresh_rate=0",
                *overrides,
            ],
        )


def _train(name: str, out: Path, overrides: list[str]) -> tuple[dict, float]:
    cfg = compose_row(name, out, overrides)
    start = time.perf_counter()
    metrics = run(cfg)
    return metrics, time.perf_counter() - start


@torch.no_grad()
def hit_rate(module, loader, k: int = 10) -> float:
    """HR@k of ``module`` (a `RecommenderModule`) over the ranking queries of ``loader``."""
    metric = RankingMetrics((k,))
    for batch in loader:
        batch = batch.to(module.device)
        metric.update(module.rank(batch), batch.relevant)
    return float(metric.compute()[f"hr@{k}"])


def time_to_quality(
    clock: Path, start: float, key: str = "test/hr@10", target: float = TARGET_HR
) -> float | None:
    """Seconds from ``start`` (a `time.time`) to the first validation in the ``clock`` file
    whose ``key`` is at least ``target``; None when none is."""
    for line in clock.read_text().splitlines():
        entry = json.loads(line)
        if entry[key] is not None and entry[key] >= target:
            return entry["time"] - start
    return None


def one_table(root: Path, overrides: list[str], start: float) -> tuple[dict, dict]:
    """Every row's run under ``root`` (NeuMF first, its `ValidationClock` on): the runs'
    (metrics, wall seconds) by name, and NeuMF's seconds from ``start`` (a `time.time`) to
    test and validation HR@10 >= `TARGET_HR` (None: never)."""
    clock = root / "neumf" / CLOCK_FILE
    clock.unlink(missing_ok=True)
    runs: dict[str, tuple[dict, float]] = {}
    # a callback of this script: `ValidationClock` as Hydra finds it, run as a script or not
    timed = [
        f"+callbacks.validation_clock._target_={__name__}.ValidationClock",
        f"+callbacks.validation_clock.path={clock}",
    ]
    runs["neumf"] = _train("neumf", root / "neumf", [*overrides, *timed])
    ttq = {key: time_to_quality(clock, start, key) for key in ("test/hr@10", "val/hr@10")}
    for name in ("mf", "gmf", "mlp"):
        runs[name] = _train(name, root / name, overrides)
    gmf, mlp = (runs[v][0]["best_model_path"] for v in ("gmf", "mlp"))
    sources = f"{{gmf: '{gmf}', mlp: '{mlp}'}}"
    runs["neumf_pretrained"] = _train(
        "neumf_pretrained", root / "neumf_pretrained", [*overrides, f"model.pretrained={sources}"]
    )
    for name, grid in GRIDS.items():
        ((key, values),) = grid.items()
        tried = [
            _train(name, root / name / f"{key.split('.')[-1]}_{v}", [*overrides, f"{key}={v}"])
            for v in values
        ]
        best = max(range(len(values)), key=lambda i: tried[i][0]["val/ndcg@10"])
        metrics, _ = tried[best]
        metrics["chosen"] = {key: values[best]}
        runs[name] = metrics, sum(wall for _, wall in tried)
    for name in runs:
        if name != "neumf":
            runs[name][0]["p_vs_neumf/test/hr@10"] = p_against_neumf(runs, name)
    return runs, ttq


def p_against_neumf(runs: dict, name: str, metric: str = "hr@10") -> float:
    """The paired t-test's p-value over the test users of ``metric`` of run ``name`` against
    NeuMF's (the runs' ``test_queries.parquet``, the same users and candidates)."""

    def figures(run: str) -> pd.Series:
        folder = Path(runs[run][0]["best_model_path"]).parents[1]
        frame, _ = read_test_results(folder / QUERIES_FILE)
        return frame.set_index(["user", "item"])[metric].sort_index()

    ours, neumf = figures(name), figures("neumf")
    if not ours.index.equals(neumf.index):
        raise RuntimeError(f"{name} and NeuMF were tested on other queries")
    return stats.paired(ours.to_numpy(), neumf.to_numpy(), resamples=1000).t_pvalue


def add_rows(bench_run: bench.Benchmark, runs: dict, ttq: dict, where: dict) -> None:
    """The table's figures as rows: each model's test HR@10 and NDCG@10, best epoch and wall
    seconds, the popularity baseline's test figures, NeuMF's time to quality."""
    neumf = runs["neumf"][0]
    for metric in METRICS:
        value = neumf[f"popularity/{metric}"]
        bench_run.add(
            system=POPULARITY, model=POPULARITY, metric=metric, unit="", value=value, settings=where
        )
    for name, label in LABELS.items():
        m, wall = runs[name]
        figures = [(metric, "", m[metric]) for metric in METRICS]
        figures += [("best_epoch", "", m["best_epoch"]), ("wall_s", "s", wall)]
        if name == "neumf_pretrained":
            sources = wall + runs["gmf"][1] + runs["mlp"][1]
            figures.append(("wall_s_with_sources", "s", sources))
        if "p_vs_neumf/test/hr@10" in m:
            figures.append(("p_vs_neumf/test/hr@10", "", m["p_vs_neumf/test/hr@10"]))
        for key, value in m.get("chosen", {}).items():
            figures.append((key, "", value))
        for metric, unit, value in figures:
            bench_run.add(
                system="recsys", model=label, metric=metric, unit=unit, value=value, settings=where
            )
    for key, seconds in ttq.items():
        bench_run.add(
            system="recsys",
            model=LABELS["neumf"],
            metric=f"seconds_to_{key}",
            unit="s",
            value=seconds,
            settings={**where, "target": TARGET_HR, "from": "process start"},
        )


def print_table(rows: list[dict], seed: int) -> None:
    """One seed's table, from its rows."""

    def value(model: str, metric: str) -> float | None:
        row = bench.find(rows, model=model, metric=metric, seed=seed)
        return None if row is None else row["value"]

    lines = [
        f"| {POPULARITY} | {value(POPULARITY, METRICS[0]):.4f} | "
        f"{value(POPULARITY, METRICS[1]):.4f} | - | - | - |"
    ]
    for name, label in LABELS.items():
        seconds = f"{value(label, 'wall_s'):.0f}"
        if label == LABELS["neumf_pretrained"]:
            seconds += f" (+ sources {value(label, 'wall_s_with_sources'):.0f})"
        p = value(label, "p_vs_neumf/test/hr@10")
        p = "-" if p is None else f"{p:.3g}"
        chosen = ", ".join(f"{k}={value(label, k)}" for k in GRIDS.get(name, {}))
        lines.append(
            f"| {label}{f' ({chosen})' if chosen else ''} | {value(label, METRICS[0]):.4f} | "
            f"{value(label, METRICS[1]):.4f} | {p} | {value(label, 'best_epoch')} | {seconds} |"
        )
    print("| model | HR@10 | NDCG@10 | p vs NeuMF (HR@10) | best epoch | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(lines))
    reached = {}
    for key in ("test/hr@10", "val/hr@10"):
        t = value(LABELS["neumf"], f"seconds_to_{key}")
        reached[key] = "never" if t is None else f"{t:.0f} s"
    print(
        f"\nNeuMF time to HR@10 >= {TARGET_HR} on the test items (the weights after each "
        f"validation): {reached['test/hr@10']} from the process's start; to val/hr@10 >= "
        f"{TARGET_HR}: {reached['val/hr@10']}"
    )


def add_summary(bench_run: bench.Benchmark, seeds: list[int]) -> None:
    """Each model's test figures over ``seeds``: their mean, the seeds' values as its runs."""
    for model in [POPULARITY, *LABELS.values()]:
        for metric in METRICS:
            values = [
                bench.find(bench_run.rows, model=model, metric=metric, seed=seed)["value"]
                for seed in seeds
            ]
            bench_run.add(
                system=POPULARITY if model == POPULARITY else "recsys",
                model=model,
                metric=metric,
                unit="",
                value=statistics.mean(values),
                settings={"seeds": seeds},
                statistic="mean",
                runs=values,
            )


def print_summary(rows: list[dict], seeds: list[int]) -> None:
    """Each model's test figures over the seeds: mean, sample standard deviation, and each."""
    print(f"\nOver seeds {', '.join(map(str, seeds))}: mean ± standard deviation (each seed)\n")
    print("| model | HR@10 | NDCG@10 | HR@10 by seed |")
    print("| --- | --- | --- | --- |")
    for model in [POPULARITY, *LABELS.values()]:
        found = {m: bench.find(rows, model=model, metric=m, seeds=seeds) for m in METRICS}
        cells = [f"{r['value']:.4f} ± {statistics.stdev(r['runs']):.4f}" for r in found.values()]
        each = " / ".join(f"{x:.4f}" for x in found[METRICS[0]]["runs"])
        print(f"| {model} | {' | '.join(cells)} | {each} |")


def main(bench_run: bench.Benchmark) -> None:
    opts = bench_run.settings
    overrides = [*(QUICK if opts.quick else []), *bench_run.overrides]
    root = Path(opts.out).resolve()
    data = "ml-100k" if opts.quick else f"ml-1m ({SUBSET})"
    if opts.seeds is None:  # the config's seed, folders directly under root
        seed = compose_row("neumf", root, overrides).seed
        where = {"seed": seed, "data": data}
        add_rows(bench_run, *one_table(root, overrides, bench.process_start()), where)
        print(f"\nNCF protocol on {data}: leave-one-out, 99 sampled negatives, test of the best")
        print(f"checkpoint by val/ndcg@10, seed={seed}; run folders under {root}\n")
        print_table(bench_run.rows, seed)
    else:
        if len(opts.seeds) < 2:
            raise ValueError(f"seeds={opts.seeds}: give two seeds or more, or leave seeds out")
        bench_run.name = "ncf_table_seeds"  # beside the one seed's table
        for seed in opts.seeds:
            folder = root / f"seed_{seed}"
            print(f"seed={seed}: its table in a fresh process, runs under {folder}", flush=True)
            args = [bench.override("quick", opts.quick), bench.override("out", folder)]
            doc = bench.run_child(
                __file__, [*args, *bench_run.overrides, f"seed={seed}"], quiet=False
            )
            bench_run.rows.extend(doc["rows"])
            print(f"\nNCF protocol on {data}, seed={seed}: leave-one-out, 99 sampled negatives,")
            print(f"test of the best checkpoint by val/ndcg@10; run folders under {folder}\n")
            print_table(bench_run.rows, seed)
        add_summary(bench_run, list(opts.seeds))
        print_summary(bench_run.rows, list(opts.seeds))
    bench_run.write()
    print(f"whole command: {time.time() - bench.process_start():.0f} s")


if __name__ == "__main__":
    main(bench.start("ncf_table", Options, __doc__))
