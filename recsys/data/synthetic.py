"""Seeded synthetic data with learnable structure, of any size: interactions
(`SyntheticDataModule`, ``data=synthetic``) and Criteo-layout click logs with a known click
model (`recsys.data.criteo_synthetic`), written from the command line::

    python -m recsys.data.synthetic format=criteo rows=1000000 out=data [layout=terabyte
        days=24] [seed=0] [gzip=true]

writes ``<out>/criteo/train.txt`` (or ``day_0`` ...) and ``oracle.json``, and prints the
oracle's AUROC on the validation and test rows: the best any model trained on them can score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data.base import RecDataModule
from recsys.data.preprocess import (
    CleaningReport,
    ProcessedData,
    assemble,
    encode_categorical,
    multi_hot_column,
    standardize,
)
from recsys.data.spec import DenseFeature, SparseFeature


class SyntheticDataModule(RecDataModule):
    """Interactions drawn from a latent-factor model with power-law popularity.

    Users and items get ``latent_dim`` Gaussian factors. Items are drawn with probability
    proportional to ``rank ** -item_exponent`` (users likewise with ``user_exponent``), so a
    few items are very popular. The label of a pair is Bernoulli(sigmoid(signal * u.v /
    sqrt(dim) + item bias)): a model that learns the factors beats popularity. Side
    features follow from the factors: each item has 1-3 ``tags`` (multi-hot, the tags nearest
    its factors), each user a ``segment``; dense ``quality`` (items) and ``taste`` (users) are
    noisy projections. Repeated (user, item) draws are removed and reported.

    Args:
        num_users, num_items, num_rows: sizes (rows before duplicates are removed).
        latent_dim, num_tags, num_segments: structure of the generator.
        item_exponent, user_exponent: power-law exponents of popularity and activity.
        signal: scale of the factor term; 0 makes labels depend on item bias only.
        **kwargs: see `RecDataModule`.
    """

    def __init__(
        self,
        num_users: int = 2000,
        num_items: int = 1000,
        num_rows: int = 100_000,
        latent_dim: int = 8,
        num_tags: int = 20,
        num_segments: int = 8,
        item_exponent: float = 0.8,
        user_exponent: float = 0.5,
        signal: float = 3.0,
        **kwargs,
    ):
        kwargs.setdefault("data_dir", ".")
        super().__init__(**kwargs)
        self.gen = {
            "num_users": num_users,
            "num_items": num_items,
            "num_rows": num_rows,
            "latent_dim": latent_dim,
            "num_tags": num_tags,
            "num_segments": num_segments,
            "item_exponent": item_exponent,
            "user_exponent": user_exponent,
            "signal": signal,
        }

    @property
    def source(self) -> str:
        return "synthetic"

    @property
    def raw_dir(self) -> Path:
        return self.data_dir

    def expected_files(self) -> list[str]:
        return []

    def settings(self) -> dict:
        return {**super().settings(), **self.gen, "seed": self.seed}

    def preprocess(self) -> ProcessedData:
        g = self.gen
        rng = np.random.default_rng(self.seed)
        nu, ni, k = g["num_users"], g["num_items"], g["latent_dim"]
        user_f = rng.normal(size=(nu, k)).astype(np.float32)
        item_f = rng.normal(size=(ni, k)).astype(np.float32)
        item_bias = rng.normal(scale=0.5, size=ni).astype(np.float32)

        def power_law(n: int, exponent: float) -> np.ndarray:
            p = rng.permutation(n).astype(np.float64) + 1.0
            p **= -exponent
            return p / p.sum()

        n = g["num_rows"]
        # int32 ids: 4 bytes a row, not 8 (memory is what tens of millions of rows test)
        users = rng.choice(nu, size=n, p=power_law(nu, g["user_exponent"])).astype(np.int32)
        items = rng.choice(ni, size=n, p=power_law(ni, g["item_exponent"])).astype(np.int32)
        logits = np.empty(n, dtype=np.float32)
        for s in range(0, n, 1 << 20):  # chunks keep memory flat at tens of millions of rows
            u, i = users[s : s + (1 << 20)], items[s : s + (1 << 20)]
            dot = np.einsum("bk,bk->b", user_f[u], item_f[i]) / np.sqrt(k)
            logits[s : s + len(u)] = g["signal"] * dot + item_bias[i]
        labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        del logits
        ratings = pd.DataFrame(
            {
                "user": users,
                "item": items,
                "label": labels,
                "rating": np.full(n, np.nan, np.float32),
                "timestamp": rng.integers(1_000_000_000, 1_100_000_000, size=n),
            },
            copy=False,  # the arrays are the frame's own: no second copy of every row
        )
        del users, items, labels

        vocab: dict[str, list[str]] = {}
        tag_centres = rng.normal(size=(g["num_tags"], k)).astype(np.float32)
        nearest = np.argsort(-(item_f @ tag_centres.T), axis=1)[:, :3]
        keep = np.arange(3)[None, :] < rng.integers(1, 4, size=ni)[:, None]
        rows = np.nonzero(keep)[0]
        tags = multi_hot_column(rows, nearest[keep] + 1, ni)
        vocab["tags"] = ["<unknown>"] + [f"tag{t}" for t in range(g["num_tags"])]
        item_table = pd.DataFrame(
            {
                "title": [f"item {i}" for i in range(ni)],
                "tags": tags.array,
                "quality": standardize(pd.Series(item_bias + rng.normal(scale=0.3, size=ni))),
            },
        )
        segment = np.argmax(user_f @ rng.normal(size=(k, g["num_segments"])), axis=1)
        user_table = pd.DataFrame(index=pd.RangeIndex(nu))
        user_table["segment"], vocab["segment"] = encode_categorical(
            pd.Series([f"segment{s}" for s in segment])
        )
        user_table["taste"] = standardize(pd.Series(user_f[:, 0] + rng.normal(scale=0.5, size=nu)))
        sparse = [
            SparseFeature("tags", "item", len(vocab["tags"]), multi_hot=True),
            SparseFeature("segment", "user", len(vocab["segment"])),
        ]
        dense = [DenseFeature("taste", "user"), DenseFeature("quality", "item")]
        report = CleaningReport(self.source)
        return assemble(report, ratings, user_table, item_table, sparse, dense, vocab)


def main(argv: list[str] | None = None) -> None:
    """The command line of the module's docstring: ``key=value`` arguments."""
    from omegaconf import OmegaConf

    from recsys.data.criteo_synthetic import generate_criteo

    args = OmegaConf.to_container(OmegaConf.from_cli(argv))
    known = {"format", "rows", "out", "layout", "days", "seed", "gzip"}
    if args.get("format") != "criteo" or "rows" not in args or set(args) - known:
        raise SystemExit(
            "usage: python -m recsys.data.synthetic format=criteo rows=N out=DIR"
            " [layout=kaggle|terabyte] [days=24] [seed=0] [gzip=false]"
            + (f"; unknown: {sorted(set(args) - known)}" if set(args) - known else "")
        )
    args.pop("format")
    out = Path(args.pop("out", "data"))
    result = generate_criteo(out, **args)
    print(f"wrote {', '.join(result['files'])} to {out / 'criteo'} ({result['rows']:,} rows)")
    for name in ("val", "test"):
        split = result["splits"][name]
        print(
            f"oracle {name}: AUROC {split['auroc']:.4f}, log loss {split['logloss']:.4f}"
            f" ({split['rows']:,} rows, click rate {split['ctr']:.3f})"
        )
    print(f"oracle scores: {out / 'criteo' / 'oracle.json'}")


if __name__ == "__main__":
    main()
