"""Train every model on every dataset and print the tables of the closing notes.

    python benchmarks/models.py pointwise [hydra overrides]   # test AUROC, throughput
    python benchmarks/models.py ranking [hydra overrides]     # leave-one-out HR/NDCG, ...

Each cell is a full `recsys.train.run` (early stopping, test on the best checkpoint) composed
from the real config; ``ranking`` also evaluates the best checkpoint with full ranking for the
list metrics (coverage, novelty). Run folders go under ``logs/benchmarks/``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from recsys import evaluate
from recsys.train import run

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = ["ncf", "hybrid", "dlrm"]
POINTWISE_DATA = ["movielens:100k", "movielens:1m", "books"]  # data option[:variant]
RANKING_DATA = ["movielens:100k", "movielens:1m"]
LOO = [
    "data.feedback=implicit",
    "data.split.kind=leave_one_out",
    "data.ranking=sampled",  # the checkpoints are then selected by val/ndcg@10
]


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


def pointwise(overrides: list[str]) -> None:
    rows = []
    for data in POINTWISE_DATA:
        for model in MODELS:
            out = Path("logs/benchmarks/pointwise") / f"{data.replace(':', '-')}_{model}"
            m, wall = _train(data, model, out, overrides)
            rows.append(
                f"| {data} | {model} | {m['test/auroc']:.4f} | "
                f"{m['popularity/test/auroc']:.4f} | "
                f"{m.get('train/samples_per_sec', float('nan')):,.0f} | {wall:.0f} |"
            )
    print("\n| data | model | test AUROC | popularity AUROC | train samples/s | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


def ranking(overrides: list[str]) -> None:
    rows = []
    for data in RANKING_DATA:
        for model in MODELS:
            for loss in ("bce", "bpr"):
                out = Path("logs/benchmarks/ranking") / f"{data.replace(':', '-')}_{model}_{loss}"
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
                rows.append(
                    f"| {data} | {model} | {loss} | {m['test/hr@10']:.4f} | "
                    f"{m['test/ndcg@10']:.4f} | {full['test/coverage@10']:.4f} | "
                    f"{full['test/novelty@10']:.2f} | {wall:.0f} |"
                )
        rows.append(
            f"| {data} | popularity | - | {m['popularity/test/hr@10']:.4f} | "
            f"{m['popularity/test/ndcg@10']:.4f} | "
            f"{full['popularity/test/coverage@10']:.4f} | "
            f"{full['popularity/test/novelty@10']:.2f} | - |"
        )
    print("\n| data | model | loss | HR@10 | NDCG@10 | coverage@10 | novelty@10 | train+test s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("pointwise", "ranking"):
        sys.exit("usage: python benchmarks/models.py pointwise|ranking [hydra overrides]")
    {"pointwise": pointwise, "ranking": ranking}[sys.argv[1]](sys.argv[2:])
