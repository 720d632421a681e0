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
from omegaconf import DictConfig, OmegaConf

from recsys.checkpoint import best_checkpoint, checkpoint_state, run_folder
from recsys.data.artifact import ArtifactDataModule
from recsys.errors import InputError, MissingInputError
from recsys.lit.module import RecommenderModule
from recsys.models.protocols import ItemEmbeddings
from recsys.retrieval import AnnRetriever, RetrievalSettings, Retriever, TwoStageRetriever
from recsys.runs import load_checkpoint
from recsys.scoring import CatalogueScorer, require_pairs


class UnknownIdError(KeyError):
    """Raw ids that are not in the model's data; ``ids`` names them all, ``shown`` the first
    `SHOWN_IDS` (each cut to `SHOWN_ID_CHARS` characters) for messages and answers."""

    SHOWN_IDS, SHOWN_ID_CHARS = 5, 64

    def __init__(self, kind: str, ids: list[str], source: str):
        self.kind, self.ids, self.source = kind, ids, source
        n = self.SHOWN_ID_CHARS
        self.shown = [i if len(i) <= n else i[: n - 1] + "…" for i in ids[: self.SHOWN_IDS]]
        super().__init__(f"{kind} {self.shown} not in {source}")

    def __str__(self) -> str:
        more = len(self.ids) - len(self.shown)
        names = ", ".join(map(repr, self.shown)) + (f" and {more} more" if more else "")
        return f"unknown {self.kind} {names}: not in {self.source}"


def checkpoint_metrics(ckpt_path: Path, state: dict) -> tuple[dict | None, str | None]:
    """The figures of the run's ``metrics.json`` when they were measured on this checkpoint,
    else None and the reason.

    A training run tests one checkpoint, its best, and ``metrics.json`` holds that one's
    figures with its ``best_epoch`` and ``best_step``. They are this checkpoint's when it holds
    the same training state (``state``, its `checkpoint_state`: ``epoch``, ``global_step``):
    the best file, a copy of it, or a ``last.ckpt`` written at that step. Any other checkpoint
    of the run (``last.ckpt`` epochs after the best, ...) gets none: ``evaluate.py`` measures it.
    """
    folder = run_folder(ckpt_path)
    if folder is None:
        return None, f"{ckpt_path} is not in a training run folder (one with metrics.json)"
    path = folder / "metrics.json"
    if not path.is_file():
        return None, f"the run {folder} has no metrics.json (it did not finish)"
    metrics = json.loads(path.read_text())
    measured = metrics.get("best_epoch"), metrics.get("best_step")
    if not metrics.get("best_model_path") or None in measured:
        return None, f"{path} holds the figures of the run's last weights, not of a checkpoint"
    here = state.get("epoch"), state.get("global_step")
    if here != measured:
        return None, (
            f"{path} holds the figures of {metrics['best_model_path']} (epoch {measured[0]}, "
            f"step {measured[1]}), not of this checkpoint (epoch {here[0]}, step {here[1]}): "
            f"python evaluate.py ckpt_path={ckpt_path} measures it"
        )
    return metrics, None


def candidate_checkpoint(path: str | Path) -> Path:
    """The checkpoint that ``candidates=`` names: a checkpoint (file or sharded folder) as it
    is, a training run folder's best checkpoint (`best_checkpoint`)."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(
            f"candidates={path} does not exist: pass a checkpoint or a training run folder "
            "of a factorised model trained on the same data"
        )
    if path.is_dir() and (path / "metrics.json").is_file():
        return best_checkpoint(path)
    return path


class Recommender:
    """Answers by raw ids, for a model and the data module it was trained on.

    Attributes:
        item_info: per item code: ``item_id``, ``title`` and the dataset's display fields.
        popular: item codes by training interactions, most first.
        metrics: the test (and validation) figures of this checkpoint from its run's
            ``metrics.json``; None when the run measured another checkpoint or has none
            (`checkpoint_metrics`), with the reason in ``metrics_note``.
        calibrated: whether sigmoid(logit) is a probability: only for binary cross-entropy on
            explicit feedback. Under implicit feedback it is the chance that a pair is the
            positive in a mix of 1 positive to ``num_negatives`` sampled negatives; BPR logits
            only order items.
        retriever: what `recommend` takes the top k from: the exhaustive ``scorer``, an
            `AnnRetriever` (``retrieval=ann``) or a `TwoStageRetriever` (``candidates``),
            as ``retrieval`` (`RetrievalSettings`) says.
    """

    def __init__(
        self,
        dm: ArtifactDataModule,
        model: RecommenderModule,
        ckpt_path: str | Path,
        task: str = "recommending",
        retrieval: RetrievalSettings | None = None,
        candidates: Recommender | None = None,
    ):
        """Raises `InputError` (`require_pairs`) for data without ids or with row features,
        for ``retrieval=ann`` on a model without an inner-product part
        (`recsys.retrieval.inner_product_part`) and for ``candidates`` of other data;
        ``task`` (``predict.py``, ``serve``) names what refused in the message.
        ``candidates``: the recommender of ``retrieval.candidates`` (`from_config` loads it).
        """
        require_pairs(dm.spec, task)
        self.ckpt_path = Path(ckpt_path)
        require_finite(model.net, self.ckpt_path)
        self.dm, self.model = dm, model.eval()
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
        self.item_vectors = None  # a model without item vectors (model=logreg) has no `similar`
        if isinstance(model.net, ItemEmbeddings):
            with torch.inference_mode():
                vectors = model.net.item_embeddings().detach().float()
                self.item_vectors = F.normalize(vectors, dim=1)
        state = checkpoint_state(self.ckpt_path)
        self.metrics, self.metrics_note = checkpoint_metrics(self.ckpt_path, state)
        # the feedback the model was trained on (allow_new_data may load other data)
        feedback = state["datamodule_hyper_parameters"].get("feedback", dm.feedback)
        self.calibrated = model.hparams.loss == "bce" and feedback == "explicit"
        self.retrieval = retrieval or RetrievalSettings()
        self.candidate_model = candidates
        self.retriever = self._retriever(task)
        # the items a user's top-k scores by a matrix product with the model's item half
        # (``catalogue_items``: every item of a factorised model scored exhaustively) and
        # through the forward, pair by pair (``forward_items``: the candidates of an index or
        # a candidate model, or every item of a model that does not factorise)
        if isinstance(self.retriever, AnnRetriever | TwoStageRetriever):
            self.catalogue_items = 0
            self.forward_items = min(self.retrieval.num_candidates, self.num_items)
        else:
            self.catalogue_items = self.num_items if self.scorer.factorised else 0
            self.forward_items = self.num_items - self.catalogue_items

    def _retriever(self, task: str) -> Retriever:
        settings, candidates = self.retrieval, self.candidate_model
        if settings.candidates is not None and candidates is None:
            raise InputError(
                f"{task}: candidates={settings.candidates} names a candidate model: build the "
                "recommender with Recommender.from_config, which loads it"
            )
        if candidates is not None:
            self._require_same_data(candidates, task)
            return TwoStageRetriever(
                candidates.retriever,
                self.model.net,
                self.dm.data.features,
                settings.num_candidates,
            )
        if settings.retrieval == "ann":
            # the index beside the checkpoint, named by what it is built from
            return AnnRetriever(self.scorer, self.dm.data.features, settings, self.ckpt_path)
        return self.scorer

    def _require_same_data(self, other: Recommender, task: str) -> None:
        """Raise `InputError` unless ``other`` (a candidate model) was trained on this
        model's processed data: the same users and items under the same codes."""
        mine, theirs = self.dm.processed_dir.name, other.dm.processed_dir.name
        same = (
            mine == theirs
            and self.user_index.equals(other.user_index)
            and self.item_index.equals(other.item_index)
        )
        if not same:
            raise InputError(
                f"{task}: the candidate model {other.ckpt_path} was trained on other data "
                f"(processed folder {theirs}, {other.num_users} users, {other.num_items} "
                f"items) than {self.ckpt_path} (processed folder {mine}, {self.num_users} "
                f"users, {self.num_items} items): candidates must come from a checkpoint "
                "trained on the same data config"
            )
        if not other.scorer.factorised:
            raise InputError(
                f"{task}: the candidate model {other.ckpt_path} ({other.model.hparams.net}) "
                "scores every (user, item) pair itself, so it saves no work as a candidate "
                "generator: use a factorised model (model=ncf, model=hybrid without side "
                "features, model=ease, model=itemknn)"
            )

    @classmethod
    def from_config(cls, cfg: DictConfig, task: str = "recommending") -> Recommender:
        """From ``cfg.ckpt_path`` (with ``paths``, ``data`` changes and ``allow_new_data``
        as for evaluate and predict: `recsys.runs.load_checkpoint`), retrieving as the
        ``retrieval``, ``ann``, ``candidates`` and ``num_candidates`` keys of ``cfg.serve``
        (serving) or of ``cfg`` (predict.py) say (`RetrievalSettings.from_config`)."""
        settings = RetrievalSettings.from_config(cfg.get("serve") or cfg)
        dm, model = load_checkpoint(cfg)
        candidates = None
        if settings.candidates is not None:
            path = candidate_checkpoint(settings.candidates)
            other = OmegaConf.merge(cfg, {"ckpt_path": str(path)})
            own = RetrievalSettings(settings.retrieval, settings.ann)  # without candidates
            candidates = cls(*load_checkpoint(other), path, task, own)
        return cls(dm, model, cfg.ckpt_path, task, settings, candidates)

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
        ``exclude_seen`` never an item the user has an interaction with. Found by
        ``retriever`` (exhaustive scoring unless ``retrieval`` says otherwise); the logits
        are the model's own either way."""
        top, logits = self.retriever.top_k(
            torch.as_tensor(user_codes, dtype=torch.long), k, self.seen if exclude_seen else None
        )
        return top.numpy(), logits.numpy()

    def similar(self, item_code: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k items nearest to the item by cosine similarity of the model's item vectors
        (the item itself excluded): codes [k] and similarities [k]."""
        if not 1 <= k < self.num_items:
            raise InputError(f"k={k} must be between 1 and {self.num_items - 1}")
        if self.item_vectors is None:
            raise InputError(
                f"{self.model.hparams.net} has no item vectors to find similar items by: "
                "use a checkpoint of model=ncf, model=hybrid or model=dlrm"
            )
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
        """sigmoid(logits) as float64 for calibrated models (`calibrated`), else None."""
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
        """The model (``calibrated``: whether its scores have probabilities), its data and
        the checkpoint's test metrics (None, and ``metrics_note`` saying why, when its run
        measured another checkpoint).

        Files are named, not placed: ``checkpoint`` is the file's name, ``run`` its run
        folder's (None outside one), and paths in the metrics and the note are relative to
        the folder that holds the run (this answer is served to clients)."""
        hp = self.model.hparams
        folder = run_folder(self.ckpt_path)
        base = f"{(folder or self.ckpt_path).parent}/"

        def named(value):
            return value.replace(base, "") if isinstance(value, str) else value

        metrics = {k: named(v) for k, v in self.metrics.items()} if self.metrics else None
        return {
            "checkpoint": self.ckpt_path.name,
            "run": folder.name if folder else None,
            "model": {
                "net": hp.net,
                **{k: v for k, v in hp.items() if k in ("variant", "interaction", "loss")},
                "parameters": sum(p.numel() for p in self.model.net.parameters()),
                "factorised_scoring": self.scorer.factorised,
                "calibrated": self.calibrated,
            },
            "data": {
                "source": self.source,
                "users": self.num_users,
                "items": self.num_items,
                "interactions": len(self.dm.data.interactions),
                "feedback": self.dm.hparams.get("feedback"),
                "item_fields": list(self.item_info.columns),
            },
            "retrieval": self.retrieval.describe(),
            "metrics": metrics,
            "metrics_note": named(self.metrics_note),
        }


def require_finite(net: torch.nn.Module, ckpt_path: Path) -> None:
    """Raise `InputError` naming the first floating-point tensor of ``net`` (parameter or
    buffer) that holds a NaN or an infinity: such a model answers garbage or fails on every
    request that touches it, so it is refused at load."""
    for name, tensor in net.state_dict().items():
        if not tensor.is_floating_point():
            continue
        bad = ~torch.isfinite(tensor.detach())
        if bad.any():
            where = bad.nonzero()[0].tolist()
            raise InputError(
                f"{ckpt_path}: {name} {tuple(tensor.shape)} holds {int(bad.sum())} NaN or "
                f"infinite values (the first at index {where}): the training diverged or the "
                "file is damaged; serve an earlier checkpoint of the run, or train again"
            )
