"""Recommendations from a checkpoint: top-K unseen items per user, or similar items."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from recsys.checkpoint import checkpoint_from_config
from recsys.console import quiet_libraries
from recsys.errors import InputError
from recsys.recommender import Recommender

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, str | int]:
    """Write and print recommendations (or similar items); returns the output path, its rows
    and the checkpoint."""
    quiet_libraries()
    # a sharded checkpoint's tables are gathered whole; data without ids or with row
    # features is refused (`recsys.scoring.require_pairs`)
    cfg.ckpt_path = checkpoint_from_config(cfg)
    rec = Recommender.from_config(cfg, "predict.py")
    if cfg.similar_to is not None:
        frame = _similar(rec, cfg.similar_to, cfg.k)
    else:
        frame = _recommendations(cfg, rec)
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".parquet":
        frame.to_parquet(output, index=False)
    elif output.suffix == ".csv":
        frame.to_csv(output, index=False)
    else:
        raise InputError(f"output={output} must end in .csv or .parquet")
    log.info(
        "%s\n(%d rows written to %s)", frame.head(50).to_string(index=False), len(frame), output
    )
    return {"output": str(output), "rows": len(frame), "ckpt_path": str(cfg.ckpt_path)}


def _similar(rec: Recommender, raw_item, k: int) -> pd.DataFrame:
    (code,) = rec.item_codes([raw_item], missing_ok=True)
    if code < 0:
        raise InputError(f"similar_to={raw_item!r} is not an item id of {rec.source}")
    return rec.similar_table(int(code), min(k, rec.num_items - 1))


def _recommendations(cfg: DictConfig, rec: Recommender) -> pd.DataFrame:
    if cfg.fallback not in (None, "popular"):
        raise InputError(f"fallback={cfg.fallback!r} must be null or 'popular'")
    if cfg.user_ids is None:
        raw_users = rec.user_index.to_numpy()
        codes = np.arange(len(raw_users))
    else:
        raw_users = np.array([str(u) for u in cfg.user_ids])
        codes = rec.user_codes(list(cfg.user_ids), missing_ok=True)
        if (codes < 0).any() and cfg.fallback is None:
            raise InputError(
                f"unknown user ids {raw_users[codes < 0].tolist()} (not in {rec.source}); pass ids "
                "from the dataset, or fallback=popular to give them the most popular items"
            )
    known = codes >= 0
    top, logits = rec.recommend(codes[known], cfg.k)
    popular = rec.popular[: cfg.k].numpy()
    unknown = int((~known).sum())
    items = np.concatenate([top.reshape(-1), np.tile(popular, unknown)])
    frame = pd.DataFrame(
        {
            "user_id": np.concatenate(
                [np.repeat(raw_users[known], cfg.k), np.repeat(raw_users[~known], cfg.k)]
            ),
            "rank": np.tile(np.arange(1, cfg.k + 1), len(codes)),
        }
    )
    frame = pd.concat([frame, rec.item_info.iloc[items].reset_index(drop=True)], axis=1)
    frame["score"] = np.concatenate([logits.reshape(-1), np.full(unknown * cfg.k, np.nan)])
    frame["source"] = ["model"] * (len(codes) - unknown) * cfg.k + ["popular"] * unknown * cfg.k
    return frame
