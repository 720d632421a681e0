"""Full-catalogue ranking speed: every user's top-10 among every item, per model.

    python benchmarks/ranking.py [data=movielens data.variant=1m] [threads=1] [seconds=5]
        [rounds=5] [results=benchmarks/results]
    python benchmarks/ranking.py quick=true     # ml-100k, 1 s per model

Other arguments are Hydra overrides of the data, in place of the default ``data=movielens
data.variant=1m`` (with ``quick=true``: ``data.variant=100k``).

For each model (the repository's configs: MF, GMF, MLP, NeuMF, Hybrid with ids only and with side
features, DLRM), `recsys.scoring.CatalogueScorer.top_k` ranks users against the whole catalogue,
their known items excluded, for ``seconds``: users/s, and for the factorised models the FLOPs
per user (the multiply-adds of the user-dependent layers) against a plain float32 matmul on
this machine. The speed of a shared machine drifts by 20% and more over minutes, so factorised
models are timed in alternating rounds (`recsys.bench.alternating_rounds`) of a 0.5 s matmul
and ``seconds / rounds`` of scoring: ``x of bound``, how far the scorer is from what its FLOP
count allows at the matmul's speed (1.0 = at the bound), is the median over rounds of the ratio
within a round, and users/s and the matmul's GFLOP/s are the medians of the rounds. Weights are
the initial ones: speed does not depend on them. Results: ``<results>/ranking.json``
(`recsys.bench`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from matmul import matmul_gflops

from recsys import bench
from recsys.bench import Settings
from recsys.scoring import CatalogueScorer

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = {
    "MF": ["model=mf"],
    "GMF": ["model=ncf", "model.variant=gmf"],
    "MLP": ["model=ncf", "model.variant=mlp"],
    "NeuMF": ["model=ncf", "model.variant=neumf"],
    "Hybrid (ids)": ["model=hybrid"],
    "Hybrid (side features)": ["model=hybrid", "model.use_side_features=true"],
    "DLRM": ["model=dlrm"],
}
DATA = ["data=movielens", "data.variant=1m"]
QUICK_DATA = ["data=movielens", "data.variant=100k"]


@dataclass
class Options(Settings):
    threads: int = 1
    seconds: float = 5.0  # of scoring per model
    rounds: int = 5


QUICK = {"seconds": 1.0}
# each figure's metric: its unit and its column in the printed table
COLUMNS = {
    "users_per_sec": ("users/s", "users/s"),
    "ms_per_user": ("ms", "ms per user"),
    "mflop_per_user": ("MFLOP", "MFLOP per user"),
    "gflops": ("GFLOP/s", "GFLOP/s"),
    "matmul_gflops": ("GFLOP/s", "matmul GFLOP/s"),
    "x_of_bound": ("x", "x of bound"),
    "setup_s": ("s", "setup s"),
}


def users_per_second(scorer: CatalogueScorer, users: torch.Tensor, dm, seconds: float) -> float:
    """Users ranked per second by `CatalogueScorer.top_k` (top-10, known items excluded),
    256 users a call from the first user on, for about ``seconds``."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds and done < len(users):
        chunk = users[done : done + 256]
        scorer.top_k(chunk, 10, dm.positives)
        done += len(chunk)
    return done / (time.perf_counter() - start)


def flops_per_user(scorer: CatalogueScorer) -> float | None:
    """FLOPs of scoring one user against every item on the factorised path: per item, the
    GMF or dot product, the add of the first MLP layer's user half (its item half is
    precomputed), every later MLP layer and the head; None for models scored pair by pair."""
    if not scorer.factorised:
        return None
    parts = scorer.item_part
    # the factor-sized product per item: NeuMF stores its GMF part transposed [G, I]
    per_item = 2 * parts["gmf"].shape[0] if "gmf" in parts else 0
    per_item += 2 * parts["dot"].shape[1] if "dot" in parts else 0
    if "mlp" in parts:
        per_item += parts["mlp"].shape[1]
        # the later layers' W^T [in, out] (`mlp_rest_weights`), then the head on the last
        per_item += sum(2 * w.shape[0] * w.shape[1] for w, _ in parts["mlp_rest"])
        last = parts["mlp_rest"][-1][0] if parts["mlp_rest"] else parts["mlp"]
        per_item += 2 * last.shape[1]
    return per_item * scorer.num_items


def time_factorised(scorer, users, dm, flops: float, opts: Options) -> tuple[dict, dict]:
    """Alternating rounds of a float32 matmul and scoring (the machine's speed drifts): the
    medians of users/s, the matmul's GFLOP/s and the paired ``x_of_bound``, and the rounds'
    values of each."""

    def measure(what: str) -> float:
        if what == "matmul":
            return matmul_gflops(4096, 512, 512, seconds=0.5)
        return users_per_second(scorer, users, dm, opts.seconds / opts.rounds)

    rounds = bench.alternating_rounds(["matmul", "scoring"], opts.rounds, measure)
    bounds = bench.paired(rounds["matmul"], rounds["scoring"], lambda g, r: g / (flops * r / 1e9))
    runs = {"users_per_sec": rounds["scoring"], "matmul_gflops": rounds["matmul"]}
    runs["x_of_bound"] = bounds
    figures = {metric: bench.median(values) for metric, values in runs.items()}
    figures["mflop_per_user"] = flops / 1e6
    figures["gflops"] = flops * figures["users_per_sec"] / 1e9
    return figures, runs


def main(run: bench.Benchmark) -> None:
    opts = run.settings
    data = run.overrides or (QUICK_DATA if opts.quick else DATA)
    torch.set_num_threads(opts.threads)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=data)
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup()
        users = torch.arange(dm.spec.num_users)
        table = []
        for name, overrides in MODELS.items():
            model_cfg = compose("train", overrides=[*data, *overrides]).model
            model = instantiate(model_cfg, spec=dm.spec.to_dict(), _recursive_=False)
            start = time.perf_counter()
            scorer = CatalogueScorer(model.net, dm.data.features, dm.spec.num_items)
            setup = time.perf_counter() - start
            scorer.top_k(users[:8], 10, dm.positives)  # warm-up
            flops = flops_per_user(scorer)
            if flops is None:
                rate = users_per_second(scorer, users, dm, opts.seconds)
                figures, runs = {"users_per_sec": rate}, {}
            else:
                figures, runs = time_factorised(scorer, users, dm, flops, opts)
            figures["setup_s"] = setup
            figures["ms_per_user"] = 1000 / figures["users_per_sec"]
            path = "factorised" if scorer.factorised else "pairs"
            where = {"data": dm.source, "threads": opts.threads, "k": 10, "path": path}
            for metric, (unit, _) in COLUMNS.items():
                if metric in figures:
                    values = runs.get(metric)
                    run.add(
                        system="recsys",
                        model=name,
                        metric=metric,
                        unit=unit,
                        value=figures[metric],
                        settings=where,
                        statistic=None if values is None else "median",
                        runs=values,
                    )
            cells = {label: figures.get(k) for k, (_, label) in COLUMNS.items()}
            table.append({"model": name, "path": path, **cells})
            print(f"{name}: {figures['users_per_sec']:,.0f} users/s", flush=True)
    print(
        f"{dm.source}: {dm.spec.num_users:,} users x {dm.spec.num_items:,} items, top-10 with "
        f"known items excluded; {opts.threads} thread(s)"
    )
    pd.set_option("display.width", 200)
    print(pd.DataFrame(table).to_string(index=False, float_format=lambda v: f"{v:,.2f}"))
    run.write()


if __name__ == "__main__":
    main(bench.start("ranking", Options, __doc__, quick=QUICK))
