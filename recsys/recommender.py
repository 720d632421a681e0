"""A trained model ready to answer questions by raw id: top-K, similar items, pair scores,
a user's history. Predictions, serving and the dashboard all use this one object.

Everything that does not depend on the question (the items' half of the model, normalised
item vectors, the index of known interactions, the id lookups, the display table) is built
once, in the constructor; answering does no file I/O.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from recsys.checkpoint import load_checkpoint, run_folder
from recsys.data.base import RecDataModule
from recsys.lit.module import RecommenderModule
from recsys.scoring import CatalogueScorer


class UnknownIdError(KeyError):
    """Raw ids that are not in the model's data; ``ids`` names them."""

    def __init__(self, kind: str, ids: list[str], source: str):
        self.kind, self.ids, self.source = kind, ids, source
        super().__init__(f"{kind} {ids} not in {source}")

    def __str__(self) -> str:
        return f"unknown {self.kind} {', '.join(map(repr, self.ids))}: not in {self.source}"


def run_metrics(ckpt_path: Path) -> dict | None:
    """The ``metrics.json`` of the run that wrote ``ckpt_path``, or None when there is none."""
    folder = run_folder(ckpt_path)
    if folder is None or not (folder / "metrics.json").is_file():
        return None
    return json.loads((folder / "metrics.json").read_text())


class Recommender:
    """Answers by raw ids, for a model and the data module it was trained on.

    Attributes:
        item_info: per item code: ``item_id``, ``title`` and the dataset's display fields.
        popular: item codes by training interactions, most first.
        metrics: the training run's ``metrics.json`` (None if not found).
    """

    def __init__(self, dm: RecDataModule, model: RecommenderModule, ckpt_path: str | Path):
        self.dm, self.model = dm, model.eval()
        self.ckpt_path = Path(ckpt_path)
        self.source = dm.source
        self.num_users, self.num_items = dm.spec.num_users, dm.spec.num_items
        self.scorer = CatalogueScorer(model.net, dm.data.features, self.num_items)
        self.user_index = pd.Index(dm.data.user_ids)
        self.item_index = pd.Index(dm.data.item_ids)
        # raw id -> code, as plain dicts: a request's lookup is a few hash probes
        self._user_code = {u: c for c, u in enumerate(self.user_index.tolist())}
        self._item_code = {i: c for c, i in enumerate(self.item_index.tolist())}
        self.item_info = dm.data.item_info
        self.item_records = self.item_info.to_dict("records")
        self.seen = dm.positives  # every known (user, item) pair, in any split
        self.popular = dm.protocol.item_popularity().argsort(descending=True, stable=True)
        with torch.inference_mode():
            self.item_vectors = F.normalize(model.net.item_embeddings().detach().float(), dim=1)
        self.metrics = run_metrics(self.ckpt_path)
        self.calibrated = model.hparams.loss == "bce"  # BPR logits are no probabilities

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Recommender:
        """From ``cfg.ckpt_path`` (with ``paths``, ``data`` changes and ``allow_new_data``
        as for evaluate and predict: `recsys.checkpoint.load_checkpoint`)."""
        dm, model = load_checkpoint(cfg)
        return cls(dm, model, cfg.ckpt_path)

    # --- ids ------------------------------------------------------------------------------
    def user_codes(self, raw_ids: list, missing_ok: bool = False) -> np.ndarray:
        """Codes [N] of raw user ids (-1 for unknown ones with ``missing_ok``).

        Raises:
            UnknownIdError: naming the unknown ids, unless ``missing_ok``.
        """
        return self._codes(self._user_code, raw_ids, "user_id", missing_ok)

    def item_codes(self, raw_ids: list, missing_ok: bool = False) -> np.ndarray:
        """Codes [N] of raw item ids; see `user_codes`."""
        return self._codes(self._item_code, raw_ids, "item_id", missing_ok)

    def _codes(self, index: dict, raw_ids: list, kind: str, missing_ok: bool) -> np.ndarray:
        wanted = [str(r) for r in raw_ids]
        codes = np.array([index.get(w, -1) for w in wanted], dtype=np.int64)
        if not missing_ok and (codes < 0).any():
            unknown = list(dict.fromkeys(w for w, c in zip(wanted, codes, strict=True) if c < 0))
            raise UnknownIdError(kind, unknown, self.source)
        return codes

    # --- answers --------------------------------------------------------------------------
    def recommend(
        self, user_codes: np.ndarray, k: int, exclude_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item codes [U, k] and logits [U, k] per user, best first; with
        ``exclude_seen`` never an item the user has an interaction with."""
        top, logits = self.scorer.top_k(
            torch.as_tensor(user_codes, dtype=torch.long), k, self.seen if exclude_seen else None
        )
        return top.numpy(), logits.numpy()

    def similar(self, item_code: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k items nearest to the item by cosine similarity of the model's item vectors
        (the item itself excluded): codes [k] and similarities [k]."""
        if not 1 <= k < self.num_items:
            raise ValueError(f"k={k} must be between 1 and {self.num_items - 1}")
        sims = self.item_vectors @ self.item_vectors[item_code]
        sims[item_code] = float("-inf")
        s, top = sims.topk(k)
        return top.numpy(), s.numpy()

    def similar_table(self, item_code: int, k: int) -> pd.DataFrame:
        """`similar` as a table: ``rank``, the items' display fields, ``similarity``."""
        codes, sims = self.similar(item_code, k)
        frame = self.item_info.iloc[codes].reset_index(drop=True)
        frame.insert(0, "rank", np.arange(1, len(frame) + 1))
        frame["similarity"] = sims
        return frame

    @torch.inference_mode()
    def score(self, user_codes: np.ndarray, item_codes: np.ndarray) -> np.ndarray:
        """Logits [N] of the (user, item) pairs, through the model's own forward."""
        users = torch.as_tensor(user_codes, dtype=torch.long)
        items = torch.as_tensor(item_codes, dtype=torch.long)
        batch = self.dm.data.features.make_batch(users, items)
        return self.model(batch).numpy()

    def probabilities(self, logits: np.ndarray) -> np.ndarray | None:
        """sigmoid(logits) as float64 for models trained with binary cross-entropy; None
        under BPR, whose logits only order items."""
        if not self.calibrated:
            return None
        return 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))

    def history(self, user_code: int) -> pd.DataFrame:
        """The user's interactions: ``item_id``, display fields, ``rating``, ``label``,
        ``timestamp`` and ``split`` (train, val or test), newest first."""
        inter = self.dm.data.interactions
        split = np.full(len(inter), "", dtype=object)
        for name, rows in self.dm.rows.items():
            split[rows.numpy()] = name
        rows = (inter.users == user_code).nonzero().flatten().numpy()
        frame = self.item_info.iloc[inter.items[rows].numpy()].reset_index(drop=True)
        frame["rating"] = inter.ratings[rows].numpy()
        frame["label"] = inter.labels[rows].numpy()
        frame["timestamp"] = inter.timestamps[rows].numpy()
        frame["split"] = split[rows]
        return frame.sort_values("timestamp", ascending=False, kind="stable")

    def metadata(self) -> dict:
        """The model, its data and the run's test metrics."""
        hp = self.model.hparams
        return {
            "ckpt_path": str(self.ckpt_path),
            "model": {
                "net": hp.net,
                **{k: v for k, v in hp.items() if k in ("variant", "interaction", "loss")},
                "parameters": sum(p.numel() for p in self.model.net.parameters()),
                "factorised_scoring": self.scorer.factorised,
            },
            "data": {
                "source": self.source,
                "users": self.num_users,
                "items": self.num_items,
                "interactions": len(self.dm.data.interactions),
                "feedback": self.dm.hparams.get("feedback"),
                "item_fields": list(self.item_info.columns),
            },
            "metrics": self.metrics,
        }
