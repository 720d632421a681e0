"""Train every model on every dataset and print a table of test AUROC and throughput.

    python benchmarks/models.py [hydra overrides for every run, e.g. trainer.max_epochs=5]

Each cell is a full `recsys.train.run` (early stopping on val/auroc, test on the best
checkpoint) composed from the real config. Run folders go under ``logs/benchmarks/``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from recsys.train import run

CONF = Path(__file__).resolve().parents[1] / "conf"


MODELS = ["ncf", "hybrid", "dlrm"]
DATA = ["movielens:100k", "movielens:1m", "books"]  # data option[:movielens variant]


def main(overrides: list[str]) -> None:
    rows = []
    for data in DATA:
        name, _, variant = data.partition(":")
        for model in MODELS:
            out = Path("logs/benchmarks") / f"{data.replace(':', '-')}_{model}"
            overrides = [
                f"data={name}",
                f"model={model}",
                "logger=csv",
                f"paths.output_dir={out}",
                "callbacks.progress_bar.refresh_rate=0",
                *([f"data.variant={variant}"] if variant else []),
                *overrides,
            ]
            with initialize_config_dir(str(CONF), version_base="1.3"):
                cfg = compose("train", overrides=overrides)
            start = time.perf_counter()
            m = run(cfg)
            rows.append(
                (
                    data,
                    model,
                    m["test/auroc"],
                    m["popularity/test/auroc"],
                    m.get("train/samples_per_sec", float("nan")),
                    time.perf_counter() - start,
                )
            )

    print("\n| data | model | test AUROC | popularity AUROC | train samples/s | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for data, model, auc, pop, sps, wall in rows:
        print(f"| {data} | {model} | {auc:.4f} | {pop:.4f} | {sps:,.0f} | {wall:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
