"""NeuMF's training step against the size of its tables and the rows a batch touches.

    python benchmarks/table_rows.py [batch_size=4096] [rounds=6] [batches=30] [threads=2]
        [quick=true] [results=benchmarks/results] [hydra overrides]

Separates the two things that grow together in ``benchmarks/scale.py``: the tables (users
rows/100, items rows/1000) and the distinct users and items of a batch. The model is the
scale benchmark's NeuMF (``model=ncf``, row-sparse table gradients, RowSparseAdam for the
tables and fused Adam for the rest, through the module's own ``configure_optimizers``). For
each pair of table size and id range, the same kind of batches (``batch_size`` positives of
uniform users and items, 4 uniform negatives each, drawn from the first ids of the range) go
through forward, backward and both optimizers' steps. The pairs run in alternating rounds in
one process (`recsys.bench.alternating_rounds`); printed: the distinct users and items a step
and the median over rounds of a round's ms a step. Batch building (negative sampling) is not
timed here: scale.py reports it. Hydra overrides go to the model's config. ``quick=true``: one
round of 3 steps of 1,024 positives (a smoke test). Results: ``<results>/table_rows.json``
(`recsys.bench`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from scale import MODELS, ROOT, sizes

from recsys import bench
from recsys.bench import Settings
from recsys.data import FeatureSpec
from recsys.data.store import FeatureStore


@dataclass
class Options(Settings):
    batch_size: int = 4096  # positives a step
    rounds: int = 6
    batches: int = 30  # steps a round
    threads: int = 2


QUICK = {"batch_size": 1024, "rounds": 1, "batches": 3}
NEGATIVES = 4
# (rows whose tables are built, rows whose catalogue the batches draw from), as scale.py sizes
# them: the 1M catalogue in every table, then each table's own
PAIRS = [
    (1_000_000, 1_000_000),
    (10_000_000, 1_000_000),
    (50_000_000, 1_000_000),
    (10_000_000, 10_000_000),
    (50_000_000, 50_000_000),
]
FIGURES = ("users_per_step", "items_per_step", "step_ms")


def batches(draw_rows: int, opts: Options, spec: FeatureSpec) -> list:
    """``opts.batches`` batches of uniform draws from the catalogue of ``draw_rows`` rows."""
    store = FeatureStore(spec, None, None)
    draw = sizes(draw_rows)
    g = torch.Generator().manual_seed(0)
    p, out = opts.batch_size, []
    for _ in range(opts.batches):
        users = torch.randint(draw["num_users"], (p,), generator=g)
        items = torch.randint(draw["num_items"], (p,), generator=g)
        negatives = torch.randint(draw["num_items"], (p * NEGATIVES,), generator=g)
        out.append(
            store.make_batch(
                torch.cat([users, users.repeat_interleave(NEGATIVES)]),
                torch.cat([items, negatives]),
                torch.cat([torch.ones(p), torch.zeros(p * NEGATIVES)]),
            )
        )
    return out


def stepper(rows: int, overrides: list[str]):
    """The scale benchmark's NeuMF with tables for ``rows`` rows, and its training step."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["model=ncf", *MODELS["ncf"], *overrides])
    spec = FeatureSpec.of_ids(**sizes(rows))
    torch.manual_seed(0)
    module = instantiate(cfg.model, spec=spec.to_dict(), _recursive_=False)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer

    def step(batch) -> None:
        F.binary_cross_entropy_with_logits(module(batch), batch.labels).backward()
        optimizer.step()
        optimizer.zero_grad()

    return spec, step


def pair_settings(rows: int, draw_rows: int) -> dict:
    t, d = sizes(rows), sizes(draw_rows)
    return {
        "table_rows": rows,
        "tables": f"{t['num_users']} x {t['num_items']}",
        "drawn_from": f"{d['num_users']} x {d['num_items']}",
    }


def main(run: bench.Benchmark) -> None:
    opts = run.settings
    torch.set_num_threads(opts.threads)
    pairs = {}
    for rows, draw_rows in PAIRS:
        spec, step = stepper(rows, run.overrides)
        data = batches(draw_rows, opts, spec)
        step(data[0])  # the optimizers' state
        distinct = {
            key: statistics.mean(len(b.ids(key).unique()) for b in data)
            for key in ("user_id", "item_id")
        }
        pairs[rows, draw_rows] = (step, data, distinct)

    def measure(pair: tuple[int, int]) -> float:
        step, data, _ = pairs[pair]
        start = time.perf_counter()
        for batch in data:
            step(batch)
        return (time.perf_counter() - start) / len(data) * 1e3

    runs = bench.alternating_rounds(list(pairs), opts.rounds, measure)
    common = {"batch_size": opts.batch_size, "negatives": NEGATIVES, "threads": opts.threads}
    for pair, (_, _, distinct) in pairs.items():
        where = {**pair_settings(*pair), **common}
        for metric, value in zip(FIGURES[:2], distinct.values(), strict=True):
            run.add(
                system="recsys", model="NeuMF", metric=metric, unit="", value=value, settings=where
            )
        run.add(
            system="recsys",
            model="NeuMF",
            metric="step_ms",
            unit="ms",
            value=bench.median(runs[pair]),
            settings=where,
            statistic="median",
            runs=runs[pair],
        )
    print(
        f"NeuMF (model=ncf, {MODELS['ncf'][0]}), {opts.batch_size:,} positives "
        f"+ {NEGATIVES} negatives each a step, {torch.get_num_threads()} threads; "
        f"{opts.rounds} alternating round(s) of {opts.batches} steps\n"
    )
    print("| tables of (users x items) | ids drawn from | users / items a step | ms a step |")
    print("| --- | --- | ---: | ---: |")
    for rows, draw_rows in PAIRS:
        where = pair_settings(rows, draw_rows)
        v = {m: bench.find(run.rows, metric=m, **where)["value"] for m in FIGURES}
        t, d = sizes(rows), sizes(draw_rows)
        print(
            f"| {rows:,} rows ({t['num_users']:,} x {t['num_items']:,}) "
            f"| {d['num_users']:,} x {d['num_items']:,} "
            f"| {v['users_per_step']:,.0f} / {v['items_per_step']:,.0f} | {v['step_ms']:.1f} |"
        )
    run.write()


if __name__ == "__main__":
    main(bench.start("table_rows", Options, __doc__, quick=QUICK))
