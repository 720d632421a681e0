"""Full-catalogue ranking speed: every user's top-10 among every item, per model.

    python benchmarks/ranking.py [data=movielens data.variant=1m] [threads=1] [seconds=5]
        [rounds=5]
    python benchmarks/ranking.py quick=true     # ml-100k, 1 s per model

Other arguments are Hydra overrides of the data (default: ml-1m).

For each model (the repository's configs: MF, GMF, MLP, NeuMF, Hybrid with ids only and with side
features, DLRM), `recsys.scoring.CatalogueScorer.top_k` ranks users against the whole catalogue,
their known items excluded, for ``seconds``: users/s, and for the factorised models the FLOPs
per user (the multiply-adds of the user-dependent layers) against a plain float32 matmul on
this machine. The speed of a shared machine drifts by 20% and more over minutes, so factorised
models are timed in ``rounds``, each a 0.5 s matmul followed by ``seconds / rounds`` of
scoring: ``x of bound``, how far the scorer is from what its FLOP count allows at the matmul's
speed (1.0 = at the bound), is the median over rounds of the ratio within a round, and users/s
and the matmul's GFLOP/s are the medians of the rounds. Weights are the initial ones: speed does
not depend on them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recsys.scoring import CatalogueScorer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul import matmul_gflops  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = {
    "MF": ["model=ncf", "model.variant=mf"],
    "GMF": ["model=ncf", "model.variant=gmf"],
    "MLP": ["model=ncf", "model.variant=mlp"],
    "NeuMF": ["model=ncf", "model.variant=neumf"],
    "Hybrid (ids)": ["model=hybrid"],
    "Hybrid (side features)": ["model=hybrid", "model.use_side_features=true"],
    "DLRM": ["model=dlrm"],
}
DEFAULTS = {"threads": 1, "seconds": 5.0, "rounds": 5, "quick": False}


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
        linears = [m for m in scorer.net.mlp if isinstance(m, torch.nn.Linear)]
        per_item += parts["mlp"].shape[1]
        per_item += sum(2 * m.in_features * m.out_features for m in linears[1:])
        per_item += 2 * linears[-1].out_features
    return per_item * scorer.num_items


def main() -> None:
    given = sys.argv[1:]
    ours = [a for a in given if a.split("=", 1)[0] in DEFAULTS]
    args = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(ours))
    data = [a for a in given if a not in ours] or ["data=movielens", "data.variant=1m"]
    if args.quick:
        data, args.seconds = ["data=movielens", "data.variant=100k"], 1.0
    torch.set_num_threads(args.threads)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=data)
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup()
        users = torch.arange(dm.spec.num_users)
        rows = []
        for name, overrides in MODELS.items():
            model_cfg = compose("train", overrides=[*data, *overrides]).model
            model = instantiate(model_cfg, spec=dm.spec.to_dict(), _recursive_=False)
            start = time.perf_counter()
            scorer = CatalogueScorer(model.net, dm.data.features, dm.spec.num_items)
            setup = time.perf_counter() - start
            scorer.top_k(users[:8], 10, dm.positives)  # warm-up
            flops = flops_per_user(scorer)
            if flops is None:
                rate, gflops, bound = users_per_second(scorer, users, dm, args.seconds), None, None
            else:  # rounds of (matmul, scoring), paired: the machine's speed drifts
                rounds = []
                for _ in range(args.rounds):
                    g = matmul_gflops(4096, 512, 512, seconds=0.5)
                    r = users_per_second(scorer, users, dm, args.seconds / args.rounds)
                    rounds.append((r, g, g / (flops * r / 1e9)))
                rate, gflops, bound = (float(np.median(x)) for x in zip(*rounds, strict=True))
            rows.append(
                {
                    "model": name,
                    "path": "factorised" if scorer.factorised else "pairs",
                    "users/s": rate,
                    "ms per user": 1000 / rate,
                    "MFLOP per user": flops / 1e6 if flops else None,
                    "GFLOP/s": flops * rate / 1e9 if flops else None,
                    "matmul GFLOP/s": gflops,
                    "x of bound": bound,
                    "setup s": setup,
                }
            )
            print(f"{name}: {rate:,.0f} users/s", flush=True)
    print(
        f"{dm.source}: {dm.spec.num_users:,} users x {dm.spec.num_items:,} items, top-10 with "
        f"known items excluded; {args.threads} thread(s)"
    )
    pd.set_option("display.width", 200)
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:,.2f}"))


if __name__ == "__main__":
    sys.exit(main())
