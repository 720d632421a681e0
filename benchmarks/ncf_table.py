"""The comparison of the NCF paper (He et al. 2017), reproduced on this platform, quickly.

    python benchmarks/ncf_table.py [quick=true] [seeds=[42,1,2]] [out=logs/benchmarks/ncf_table]
        [hydra overrides]

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
  (``model.pretrained``); its wall time is its own run's, and ``+ sources`` adds theirs.

NeuMF runs first, so its time to quality counts from the command's start: the seconds from the
start until the end of the first validation after which the weights of that moment reach
``TARGET_HR`` in the table's own figure, HR@10 on the test items (start-up, data loading and
the evaluations included). `ValidationClock`, a callback added to that run, appends the wall
clock, ``val/hr@10`` and the current weights' test HR@10 after each validation to
``validation_clock.jsonl`` in the run folder; the figures are read from there (``never`` when
none reached it). The test items only time the run: the checkpoint is still chosen by
validation. The time to ``val/hr@10`` is printed beside it; under the paper's validation rows
(one random interaction per user, ``data.split.val_row=random``) validation runs well above
test, so that figure says little by itself.

Options: ``quick=true`` (ml-100k, one epoch per run: a smoke test), ``out`` (the folder of the
run folders), ``seeds`` (two or more: the whole table once per ``seed``, each in
``<out>/seed_<seed>``, then each model's test HR@10 and NDCG@10 over them: mean, sample standard
deviation and each seed's; a seed draws the validation rows, the sampled candidates, the
negatives and the initial weights, so the spread is that of the protocol and the training
together, and NeuMF's time to quality counts from the start of its seed's runs); anything else
is a Hydra override given to every run, e.g. ``trainer.max_epochs=3``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from recsys.metrics import RankingMetrics
from recsys.train import run

CONF = Path(__file__).resolve().parents[1] / "conf"
DEFAULTS = {"quick": False, "out": "logs/benchmarks/ncf_table", "seeds": None}
QUICK = ["data.variant=100k", "trainer.max_epochs=1"]
TARGET_HR = 0.70
CLOCK_FILE = "validation_clock.jsonl"
SUBSET = "a subset: 487,650 of 1,000,209 ratings, users 1-2,999"


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


def _train(name: str, out: Path, overrides: list[str]) -> tuple[dict, float]:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            [
                f"experiment=ncf_{name}",
                "logger=csv",
                f"paths.output_dir={out}",
                "callbacks.progress_bar.refresh_rate=0",
                *overrides,
            ],
        )
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


LABELS = {
    "mf": "MF (Rendle et al. 2020)",
    "gmf": "GMF",
    "mlp": "MLP",
    "neumf": "NeuMF",
    "neumf_pretrained": "NeuMF pretrained",
}


def one_table(root: Path, overrides: list[str]) -> tuple[dict[str, tuple[dict, float]], dict]:
    """Every row's run under ``root`` (NeuMF first, its `ValidationClock` on): the runs'
    (metrics, wall seconds) by name, and NeuMF's seconds from this call's start to test and
    validation HR@10 >= `TARGET_HR` (None: never)."""
    start = time.time()
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
    return runs, ttq


def print_table(runs: dict[str, tuple[dict, float]], ttq: dict, since: str) -> None:
    neumf = runs["neumf"][0]
    rows = [
        f"| popularity | {neumf['popularity/test/hr@10']:.4f} | "
        f"{neumf['popularity/test/ndcg@10']:.4f} | - | - |"
    ]
    for name, label in LABELS.items():
        m, wall = runs[name]
        seconds = f"{wall:.0f}"
        if name == "neumf_pretrained":
            seconds += f" (+ sources {wall + runs['gmf'][1] + runs['mlp'][1]:.0f})"
        rows.append(
            f"| {label} | {m['test/hr@10']:.4f} | {m['test/ndcg@10']:.4f} | "
            f"{m['best_epoch']} | {seconds} |"
        )
    print("| model | HR@10 | NDCG@10 | best epoch | wall s |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    reached = {k: "never" if t is None else f"{t:.0f} s" for k, t in ttq.items()}
    print(
        f"\nNeuMF time to HR@10 >= {TARGET_HR} on the test items (the weights after each "
        f"validation): {reached['test/hr@10']} from {since}; to val/hr@10 >= "
        f"{TARGET_HR}: {reached['val/hr@10']}"
    )


def print_summary(tables: dict[int, tuple[dict, dict]]) -> None:
    """Each model's test figures over the seeds: mean, sample standard deviation, and each."""
    print(f"\nOver seeds {', '.join(map(str, tables))}: mean ± standard deviation (each seed)\n")
    print("| model | HR@10 | NDCG@10 | HR@10 by seed |")
    print("| --- | --- | --- | --- |")
    names = {"popularity": "popularity", **LABELS}
    for name, label in names.items():
        prefix, run = ("popularity/", "neumf") if name == "popularity" else ("", name)
        figures = {
            key: [runs[run][0][f"{prefix}test/{key}"] for runs, _ in tables.values()]
            for key in ("hr@10", "ndcg@10")
        }
        cells = [f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}" for v in figures.values()]
        each = " / ".join(f"{x:.4f}" for x in figures["hr@10"])
        print(f"| {label} | {' | '.join(cells)} | {each} |")


def main() -> None:
    start = time.time()
    ours = [a for a in sys.argv[1:] if a.partition("=")[0] in DEFAULTS]
    args = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(ours))
    # the Hydra overrides as they were typed (from_cli would nest dotted keys)
    overrides = [*(QUICK if args.quick else []), *(a for a in sys.argv[1:] if a not in ours)]
    root = Path(args.out).resolve()
    data = "ml-100k" if args.quick else f"ml-1m ({SUBSET})"
    if args.seeds is None:  # the config's seed, folders directly under root
        runs, ttq = one_table(root, overrides)
        print(f"\nNCF protocol on {data}: leave-one-out, 99 sampled negatives, test of the best")
        print(f"checkpoint by val/ndcg@10; run folders under {root}\n")
        print_table(runs, ttq, "the command's start")
    else:
        if len(args.seeds) < 2:
            sys.exit(f"seeds={list(args.seeds)}: give two seeds or more, or leave seeds out")
        tables = {}
        for seed in args.seeds:
            folder = root / f"seed_{seed}"
            tables[seed] = one_table(folder, [*overrides, f"seed={seed}"])
            print(f"\nNCF protocol on {data}, seed={seed}: leave-one-out, 99 sampled negatives,")
            print(f"test of the best checkpoint by val/ndcg@10; run folders under {folder}\n")
            print_table(*tables[seed], "the start of this seed's runs")
        print_summary(tables)
    print(f"whole command: {time.time() - start:.0f} s")


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        sys.exit(__doc__)
    main()
