"""NeuMF's training step against the size of its tables and the rows a batch touches.

    python benchmarks/table_rows.py [batch_size=4096] [rounds=6] [batches=30] [quick=true]

Separates the two things that grow together in ``benchmarks/scale.py``: the tables (users
rows/100, items rows/1000) and the distinct users and items of a batch. The model is the
scale benchmark's NeuMF (``model=ncf``, row-sparse table gradients, RowSparseAdam for the
tables and fused Adam for the rest, through the module's own ``configure_optimizers``). For
each pair of table size and id range, the same kind of batches (``batch_size`` positives of
uniform users and items, 4 uniform negatives each, drawn from the first ids of the range) go
through forward, backward and both optimizers' steps. The pairs run in alternating rounds in
one process; printed: the distinct users and items a step and the median ms a step.
Batch building (negative sampling) is not timed here: scale.py reports it. ``quick=true``:
one round of 3 steps of 1,024 positives (a smoke test).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recsys.data import FeatureSpec
from recsys.data.store import FeatureStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import MODELS, ROOT, sizes  # noqa: E402

DEFAULTS = {"batch_size": 4096, "rounds": 6, "batches": 30, "quick": False}
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


def batches(draw_rows: int, args, spec: FeatureSpec) -> list:
    """``args.batches`` batches of uniform draws from the catalogue of ``draw_rows`` rows."""
    store = FeatureStore(spec, None, None)
    draw = sizes(draw_rows)
    g = torch.Generator().manual_seed(0)
    p, out = args.batch_size, []
    for _ in range(args.batches):
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


def stepper(rows: int):
    """The scale benchmark's NeuMF with tables for ``rows`` rows, and its training step."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["model=ncf", *MODELS["ncf"]])
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


def main() -> None:
    args = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(sys.argv[1:]))
    if args.quick:
        args.merge_with(QUICK)
    torch.set_num_threads(2)
    runs = {}
    for rows, draw_rows in PAIRS:
        spec, step = stepper(rows)
        data = batches(draw_rows, args, spec)
        step(data[0])  # the optimizers' state
        distinct = {
            key: statistics.mean(len(b.ids(key).unique()) for b in data)
            for key in ("user_id", "item_id")
        }
        runs[rows, draw_rows] = (step, data, distinct, [])
    for r in range(args.rounds):
        for step, data, _, times in list(runs.values())[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            for batch in data:
                step(batch)
            times.append((time.perf_counter() - start) / len(data) * 1e3)
    print(
        f"NeuMF (model=ncf, {MODELS['ncf'][0]}), {args.batch_size:,} positives "
        f"+ {NEGATIVES} negatives each a step, {torch.get_num_threads()} threads; "
        f"{args.rounds} alternating round(s) of {args.batches} steps\n"
    )
    print("| tables of (users x items) | ids drawn from | users / items a step | ms a step |")
    print("| --- | --- | ---: | ---: |")
    for (rows, draw_rows), (_, _, distinct, times) in runs.items():
        t, d = sizes(rows), sizes(draw_rows)
        print(
            f"| {rows:,} rows ({t['num_users']:,} x {t['num_items']:,}) "
            f"| {d['num_users']:,} x {d['num_items']:,} "
            f"| {distinct['user_id']:,.0f} / {distinct['item_id']:,.0f} "
            f"| {statistics.median(times):.1f} |"
        )


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        sys.exit(__doc__)
    main()
