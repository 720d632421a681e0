"""Recommendations from a checkpoint: top-K unseen items per user, or similar items."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from recsys.checkpoint import load_checkpoint
from recsys.data.base import RecDataModule
from recsys.lit.module import RecommenderModule

log = logging.getLogger(__name__)


def codes_of(raw_ids: np.ndarray, wanted: list) -> tuple[np.ndarray, list]:
    """Codes of the raw ids found, and the raw ids not in the dataset."""
    index = pd.Index(raw_ids)
    wanted_str = [str(w) for w in wanted]
    pos = index.get_indexer(wanted_str)
    return pos, [w for w, p in zip(wanted_str, pos, strict=True) if p < 0]


@torch.no_grad()
def recommend(
    model: RecommenderModule, dm: RecDataModule, users: torch.Tensor, k: int, batch_users: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items [U, k] and scores [U, k] per user, excluding items the user already has."""
    num_items = dm.spec.num_items
    if k > num_items:
        raise ValueError(f"k={k} exceeds the {num_items} items of {dm.source}")
    model.eval()
    all_items = torch.arange(num_items)
    tops, scores = [], []
    for chunk in users.split(batch_users):
        flat_users = chunk.repeat_interleave(num_items)
        flat_items = all_items.repeat(len(chunk))
        logits = model(dm.data.features.make_batch(flat_users, flat_items)).view(-1, num_items)
        seen = dm.positives.contains(flat_users, flat_items).view(-1, num_items)
        s, top = logits.masked_fill(seen, float("-inf")).topk(k, dim=1)
        tops.append(top)
        scores.append(s)
    return torch.cat(tops), torch.cat(scores)


def _item_table(dm: RecDataModule, items: np.ndarray) -> dict[str, np.ndarray]:
    out = {"item_id": dm.data.item_ids[items]}
    if dm.data.item_titles is not None:
        out["title"] = dm.data.item_titles[items]
    return out


def similar_items(model: RecommenderModule, dm: RecDataModule, raw_item, k: int) -> pd.DataFrame:
    """The k items nearest to ``raw_item`` by cosine similarity of the model's item vectors."""
    (code,), unknown = codes_of(dm.data.item_ids, [raw_item])
    if unknown:
        raise ValueError(f"similar_to={raw_item!r} is not an item id of {dm.source}")
    vectors = F.normalize(model.net.item_embeddings().detach().float(), dim=1)
    sims = vectors @ vectors[code]
    sims[code] = float("-inf")
    s, top = sims.topk(min(k, len(sims) - 1))
    top = top.numpy()
    return pd.DataFrame(
        {"rank": np.arange(1, len(top) + 1), **_item_table(dm, top), "similarity": s.numpy()}
    )


def run(cfg: DictConfig) -> dict[str, str | int]:
    """Write and print recommendations (or similar items); returns the output path and rows."""
    dm, model = load_checkpoint(cfg)  # a sharded checkpoint's tables are gathered whole
    if cfg.similar_to is not None:
        frame = similar_items(model, dm, cfg.similar_to, cfg.k)
    else:
        frame = _recommendations(cfg, model, dm)
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".parquet":
        frame.to_parquet(output, index=False)
    elif output.suffix == ".csv":
        frame.to_csv(output, index=False)
    else:
        raise ValueError(f"output={output} must end in .csv or .parquet")
    log.info(
        "%s\n(%d rows written to %s)", frame.head(50).to_string(index=False), len(frame), output
    )
    return {"output": str(output), "rows": len(frame)}


def _recommendations(cfg: DictConfig, model: RecommenderModule, dm: RecDataModule):
    if cfg.fallback not in (None, "popular"):
        raise ValueError(f"fallback={cfg.fallback!r} must be null or 'popular'")
    if cfg.user_ids is None:
        raw_users = dm.data.user_ids
        codes = np.arange(len(raw_users))
        unknown: list = []
    else:
        raw_users = np.array([str(u) for u in cfg.user_ids])
        codes, unknown = codes_of(dm.data.user_ids, list(cfg.user_ids))
        if unknown and cfg.fallback is None:
            raise ValueError(
                f"unknown user ids {unknown} (not in {dm.source}); pass ids from the dataset, "
                "or fallback=popular to give them the most popular items"
            )
    known = codes >= 0
    top, scores = recommend(model, dm, torch.from_numpy(codes[known]), cfg.k, cfg.batch_users)
    k = top.shape[1] if len(top) else cfg.k
    frames = [
        pd.DataFrame(
            {
                "user_id": np.repeat(raw_users[known], k),
                "rank": np.tile(np.arange(1, k + 1), int(known.sum())),
                **_item_table(dm, top.flatten().numpy()),
                "score": scores.flatten().numpy(),
                "source": "model",
            }
        )
    ]
    if unknown:
        counts = torch.bincount(dm.data.interactions.items, minlength=dm.spec.num_items)
        popular = counts.topk(cfg.k).indices.numpy()
        frames.append(
            pd.DataFrame(
                {
                    "user_id": np.repeat(np.array(unknown), cfg.k),
                    "rank": np.tile(np.arange(1, cfg.k + 1), len(unknown)),
                    **_item_table(dm, np.tile(popular, len(unknown))),
                    "score": np.nan,
                    "source": "popular",
                }
            )
        )
    return pd.concat(frames, ignore_index=True)
