"""The LightningModule shared by every model: loss, metrics and optimizers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
import torch.nn.functional as F
from hydra.utils import get_class, instantiate
from torch import nn
from torchmetrics import CatMetric, MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys.checkpoint import check_classes, checkpoint_state, load_weights_only
from recsys.config import plain
from recsys.data.batch import Batch
from recsys.data.negatives import bpr_loss
from recsys.data.protocol import diversity_feature
from recsys.data.ranking import RankingBatch
from recsys.data.spec import FeatureSpec
from recsys.lit.optim import CombinedOptimizer
from recsys.metrics.ranking import (
    RankingMetrics,
    catalogue_coverage,
    intra_list_diversity,
    novelty,
    per_user,
    personalization,
)
from recsys.models.common import ClosedForm
from recsys.models.ncf import upgrade_hparams
from recsys.models.protocols import EmbeddingPenalty, Pretrainable, SparseGrad
from recsys.scoring import CatalogueScorer

LOSSES = ("bce", "bpr")


class RecommenderModule(L.LightningModule):
    """Trains any `recsys.models` network on `Batch` objects with a pointwise loss.

    All arguments are primitives (saved as hyperparameters), so
    ``RecommenderModule.load_from_checkpoint(path)`` rebuilds the network without Hydra (of
    the platform's classes only, `recsys.checkpoint.check_classes`).

    Args:
        net: import path of the network class, e.g. ``recsys.models.NeuMF``.
        spec: the dataset's `FeatureSpec` as a dict (``FeatureSpec.to_dict()``).
        optimizer: Hydra config of a partial optimizer (``_partial_: true``) for the dense
            parameters, and for all parameters when ``sparse_optimizer`` is None.
        sparse_optimizer: optional partial optimizer for the embedding tables (TorchRec
            practice: e.g. Adagrad for the sparse part, Adam for the dense part). Both run
            as one `CombinedOptimizer`, so Lightning counts one step per optimizer step and
            clips, accumulates and schedules every parameter. Tables whose optimizer is
            fused into the backward pass (``apply_optimizer_in_backward``, as the torchrec
            strategy does for sharded tables) are left to it.
        lr_scheduler: optional partial learning-rate scheduler (``_partial_: true``), called
            with the optimizer and stepped after every optimizer step, e.g.
            ``torch.optim.lr_scheduler.CosineAnnealingLR`` with ``T_max`` or
            `recsys.lit.optim.cosine_with_warmup`. The learning rates are logged per step
            (``train/lr``, and ``train/lr_sparse`` for the tables).
        loss: ``bce`` (binary cross-entropy on logits) or ``bpr`` (Bayesian personalised
            ranking: -log sigmoid(s_pos - s_neg) over each positive and its sampled
            negatives; needs ``data.feedback=implicit``). It decides the pointwise figures:
            ``auroc`` under both; ``accuracy``, ``val/loss`` and ``test/logloss`` (binary
            cross-entropy) under ``bce`` alone, since BPR leaves the logits' offset free and
            ``sigmoid(logit)`` is then no probability. ``train/loss`` is the loss itself.
        l2: weight of the network's ``embedding_l2(batch)`` penalty (`EmbeddingPenalty`; NeuMF's
            and MF's: the mean squared norm of the rows each pair looks up, Rendle et al. 2020),
            added to the training loss; 0 adds nothing. ``train/loss`` stays the ``loss``
            alone, comparable with ``val/loss`` (``bce``).
        ranking_ks: cut-offs of the ranking metrics (``hr@K``, ``ndcg@K``, ``recall@K``) when
            the data module adds a ranking loader (``data.ranking``).
        list_k: length of the recommendation lists whose coverage, novelty, diversity and
            personalization are reported after full-ranking tests. Novelty and diversity
            need the training data's item statistics: `set_item_statistics`. Diversity is
            measured on the items' multi-hot feature (`diversity_feature`: genres, tags), the
            same vectors for every model, and is not reported for data without one.
        **net_kwargs: passed to the network (e.g. ``variant``, ``mlp_layers``).
    """

    def __init__(
        self,
        net: str,
        spec: dict,
        optimizer: dict | None = None,
        sparse_optimizer: dict | None = None,
        lr_scheduler: dict | None = None,
        loss: str = "bce",
        l2: float = 0.0,
        ranking_ks: tuple[int, ...] = (5, 10, 20),
        list_k: int = 10,
        **net_kwargs: Any,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"model.loss={loss!r} is not one of {LOSSES}")
        optimizer, sparse_optimizer, lr_scheduler, spec, ranking_ks = (
            plain(optimizer),
            plain(sparse_optimizer),
            plain(lr_scheduler),
            plain(spec),
            plain(ranking_ks),
        )
        net_kwargs = {k: plain(v) for k, v in net_kwargs.items()}  # weights_only loads them
        self.save_hyperparameters()
        # checkpoints and configs of earlier versions (NeuMF variant=mf), saved as built
        upgraded, upgraded_kwargs = upgrade_hparams(net, net_kwargs)
        if (upgraded, upgraded_kwargs) != (net, net_kwargs):
            for key in net_kwargs:
                del self.hparams[key]
            self.hparams.update(net=upgraded, **upgraded_kwargs)
        net, net_kwargs = upgraded, upgraded_kwargs
        self.spec = FeatureSpec.from_dict(spec)
        self.net = get_class(net)(spec=self.spec, **net_kwargs)
        if l2 < 0:
            raise ValueError(f"model.l2={l2}: the penalty's weight must be >= 0")
        if l2 > 0 and not isinstance(self.net, EmbeddingPenalty):
            raise ValueError(
                f"model.l2={l2}: {net} has no embedding_l2 penalty (recsys.models.NeuMF and "
                "recsys.models.MF have): set model.l2=0 and regularise with "
                "model.optimizer.weight_decay"
            )
        # the pointwise figures that the loss gives a meaning (`pointwise_loss`)
        self.val_metrics = self._metrics("val/")
        self.test_metrics = self._metrics("test/")
        # NaN losses count (a NaN figure) rather than being dropped: testing for them at each
        # update would read back from the device
        self.val_loss = MeanMetric(nan_strategy="disable") if self.pointwise_loss else None
        self.test_logloss = MeanMetric(nan_strategy="disable") if self.pointwise_loss else None
        # the epoch's loss summed over samples, and its samples: their ratio is the epoch's mean
        # (MeanMetric(nan_strategy="disable") ignores weights in torchmetrics 1.9, and its other
        # strategies test for NaN at every update, a device sync per step on a GPU). Each step
        # adds to plain tensors (a metric update costs about 0.1 ms, 1% of a small batch's step
        # on the CPU); the metrics take the sums once, on the epoch's last step, and reduce
        # them across ranks
        self.train_loss_sum = SumMetric(nan_strategy="disable")
        self.train_samples = SumMetric(nan_strategy="disable")
        self._epoch_loss: torch.Tensor | None = None
        self._epoch_samples = 0
        self.val_ranking, self.test_ranking = RankingMetrics(ranking_ks), RankingMetrics(ranking_ks)
        # top-K lists of full-ranking tests, flattened (item codes: no NaN to test for)
        self.test_lists = CatMetric(nan_strategy="disable")
        # the test's figures of each query and of each pointwise row (`_per_query_results`),
        # gathered across ranks; float64 keeps user and item codes exact
        self.test_queries = CatMetric(nan_strategy="disable").set_dtype(torch.float64)
        self.test_rows = CatMetric(nan_strategy="disable").set_dtype(torch.float64)
        self.test_results: dict[str, pd.DataFrame] = {}
        self.scoring = {"users": 0, "seconds": 0.0}
        self._catalogue: CatalogueScorer | None = None  # full ranking, per evaluation
        # item statistics of the training data (`set_item_statistics`), saved in checkpoints:
        # training interactions per item [num_items], and the multi-hot vectors [num_items, V]
        # of the item feature that measures diversity (bool; None: no such feature, and no
        # diversity figure)
        feature = diversity_feature(self.spec)
        self.register_buffer("item_popularity", torch.zeros(self.spec.num_items))
        self.register_buffer(
            "item_vectors",
            None
            if feature is None
            else torch.zeros(self.spec.num_items, feature.num_embeddings, dtype=torch.bool),
        )
        # prepended to the names of test metrics, e.g. "popularity/" for the baseline
        self.metric_prefix = ""

    @property
    def pointwise_loss(self) -> bool:
        """Whether the loss fits ``sigmoid(logit)`` to each pair's label: ``bce`` does; ``bpr``
        fixes the differences between a user's logits, not their offset. AUROC and the ranking
        metrics depend on the logits' order alone; accuracy and the binary cross-entropy
        (``val/loss``, ``test/logloss``) are reported only under a pointwise loss."""
        return self.hparams.loss == "bce" and not self.closed_form

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path, *args: Any, trusted_classes: tuple = (), **kwargs: Any
    ) -> RecommenderModule:
        """Lightning's ``load_from_checkpoint``, after `check_classes` found only the
        platform's classes (or ``trusted_classes``) named in the file."""
        check_classes(checkpoint_state(Path(checkpoint_path)), checkpoint_path, trusted_classes)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    @property
    def closed_form(self) -> bool:
        """Whether the network is fitted in closed form (`ClosedForm`): no optimizer steps,
        scores that only rank."""
        return isinstance(self.net, ClosedForm)

    def _metrics(self, prefix: str) -> MetricCollection:
        # the batches' labels are 0/1 by construction; checking them reads back from the device
        metrics = {"auroc": BinaryAUROC(validate_args=False)}
        if self.pointwise_loss:
            metrics["accuracy"] = BinaryAccuracy(validate_args=False)
        return MetricCollection(metrics, prefix=prefix)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [B] for the pairs of the batch."""
        return self.net(batch)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        if self.closed_form:  # fitted before the fit (`recsys.train.build`): nothing to step
            return None
        logits = self(batch)
        if self.hparams.loss == "bpr":
            loss = bpr_loss(logits, batch.num_negatives)
        else:
            loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        objective = loss
        if self.hparams.l2:
            objective = loss + self.hparams.l2 * self.net.embedding_l2(batch)
        # self.log costs about a millisecond a call on the CPU, a tenth of a small batch's step:
        # the step figures are logged at the steps the loggers write (every
        # trainer.log_every_n_steps), the epoch's mean loss once (`on_train_batch_end`)
        step_loss = loss.detach() * len(batch)
        self._epoch_loss = step_loss if self._epoch_loss is None else self._epoch_loss + step_loss
        self._epoch_samples += len(batch)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss_step", loss.detach(), prog_bar=True, batch_size=len(batch))
            if self.hparams.lr_scheduler is not None:
                self.log_dict(self._learning_rates(), on_step=True, on_epoch=False)
        return objective

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        """Logs the epoch's mean loss (``train/loss``) once, after its last batch: the last of
        the epoch, or the one whose optimizer step ends the fit (``trainer.max_steps``). Here,
        after the step, rather than in ``training_step``, where every batch of the last
        accumulation window (``trainer.accumulate_grad_batches``) sees the same global step."""
        if self.closed_form or not (
            self.trainer.is_last_batch or 0 < self.trainer.max_steps <= self.global_step
        ):
            return
        self.train_loss_sum.update(self._epoch_loss)
        self.train_samples.update(float(self._epoch_samples))
        epoch_loss = self.train_loss_sum.compute() / self.train_samples.compute()
        self.log("train/loss", epoch_loss, on_step=False, on_epoch=True, batch_size=len(batch))
        self._reset_train_loss()

    def _learning_rates(self) -> dict[str, float]:
        """The lr of the dense parameters' first group, and of the tables' when they have
        their own optimizer here (not fused into the backward pass)."""
        optimizer = self.optimizers().optimizer
        if not isinstance(optimizer, CombinedOptimizer):
            return {"train/lr": optimizer.param_groups[0]["lr"]}
        parts = optimizer.parts
        return {
            "train/lr": parts["dense"].param_groups[0]["lr"],
            "train/lr_sparse": parts["sparse"].param_groups[0]["lr"],
        }

    def _eval_step(
        self,
        batch: Batch,
        metrics: MetricCollection,
        loss: MeanMetric | None,
        rows: CatMetric | None = None,
    ) -> None:
        logits = self(batch)
        labels = batch.labels
        if loss is not None:
            loss.update(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"))
        metrics.update(torch.sigmoid(logits), labels.long())
        if rows is not None:
            ids = [batch.ids(f"{e}_id") if self.spec.has_ids else None for e in ("user", "item")]
            ids = [torch.full_like(logits, -1) if i is None else i for i in ids]
            rows.update(torch.stack([ids[0], ids[1], labels, logits], dim=1).double())

    def rank(self, batch: RankingBatch) -> torch.Tensor:
        """Scores [Q, C] of each query's candidates; -inf where a candidate is not valid.

        Full ranking (no pairs in the batch) scores the users against every item with the
        catalogue scorer, built once per evaluation (the item part of factorised models)."""
        if batch.pairs is None:
            if self._catalogue is None:  # one forward per batch otherwise: collective-safe
                self._catalogue = CatalogueScorer(
                    self.net, batch.features, batch.items.shape[1], max_pairs=None
                )
            logits = self._catalogue.scores(batch.users)
        else:
            logits = self(batch.pairs).view(batch.items.shape)
        return logits.masked_fill(~batch.valid, float("-inf"))

    def on_train_epoch_start(self) -> None:
        self._reset_train_loss()  # an epoch resumed mid-way, or after one cut short

    def _reset_train_loss(self) -> None:
        self._epoch_loss, self._epoch_samples = None, 0
        self.train_loss_sum.reset()
        self.train_samples.reset()

    def on_validation_epoch_start(self) -> None:
        self._catalogue = None  # new weights: the catalogue scorer's item part is rebuilt

    def on_test_epoch_start(self) -> None:
        self._catalogue = None

    def validation_step(self, batch: Batch | RankingBatch, batch_idx: int, dataloader_idx=0):
        if isinstance(batch, RankingBatch):
            self.val_ranking.update(self.rank(batch), batch.relevant)
        else:
            self._eval_step(batch, self.val_metrics, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        if self.val_loss is not None:
            self.log("val/loss", self.val_loss.compute(), prog_bar=True)
            self.val_loss.reset()
        if self.val_ranking.update_called:
            self.log_dict({f"val/{k}": v for k, v in self.val_ranking.compute().items()})
        for m in (self.val_metrics, self.val_ranking):
            m.reset()

    def test_step(self, batch: Batch | RankingBatch, batch_idx: int, dataloader_idx=0):
        if not isinstance(batch, RankingBatch):
            self._eval_step(batch, self.test_metrics, self.test_logloss, self.test_rows)
            return
        start = time.perf_counter()
        scores = self.rank(batch)
        self.scoring["seconds"] += time.perf_counter() - start
        self.scoring["users"] += len(batch)
        queries = per_user(scores, batch.relevant, self.test_ranking.ks)
        self.test_ranking.update(scores, batch.relevant, queries)
        if batch.pairs is None:  # full ranking: these are recommendation lists
            top = scores.topk(min(self.hparams.list_k, scores.shape[1]), dim=1).indices
            self.test_lists.update(batch.items.gather(1, top).flatten())
            item = torch.full_like(batch.users, -1)  # no one held-out item
        else:  # sampled: the held-out item is the query's one relevant candidate
            first = batch.relevant.to(torch.uint8).argmax(1, keepdim=True)
            item = batch.items.gather(1, first)[:, 0]
        columns = [batch.users, item, *(queries[c] for c in self.query_columns)]
        self.test_queries.update(torch.stack([c.double() for c in columns], dim=1))

    def on_test_epoch_end(self) -> None:
        out = dict(self.test_metrics.compute())
        if self.test_logloss is not None:
            out["test/logloss"] = self.test_logloss.compute()
            self.test_logloss.reset()
        if self.test_ranking.update_called:
            out.update({f"test/{k}": v for k, v in self.test_ranking.compute().items()})
            seconds = max(self.scoring["seconds"], 1e-9)
            out["test/users_per_sec"] = self.scoring["users"] / seconds * self.trainer.world_size
        if self.test_lists.update_called:
            out.update(self._list_metrics(self.test_lists.compute()))
        self.log_dict({self.metric_prefix + k: v for k, v in out.items()})
        self.test_results = self._per_query_results()
        for m in (self.test_metrics, self.test_ranking, self.test_lists):
            m.reset()
        self.scoring = {"users": 0, "seconds": 0.0}

    @property
    def query_columns(self) -> list[str]:
        """The figures of each ranking query collected by `test_step` (``evaluated``: it has
        a held-out positive)."""
        ks = self.test_ranking.ks
        metrics = [f"{m}@{k}" for m in ("hr", "ndcg", "recall") for k in ks]
        return ["evaluated", "rank", *metrics, "mrr"]

    def _per_query_results(self) -> dict[str, pd.DataFrame]:
        """The last test's figures per ranking query (``queries``: user, held-out item, rank
        of the held-out item, each metric) and per pointwise row (``rows``: user, item,
        label, logit), gathered from every rank; codes are -1 where the data has none. Only
        queries with a held-out positive are kept (the others count in no mean)."""
        out = {}
        if self.test_queries.update_called:
            table = self.test_queries.compute().cpu().numpy()
            frame = pd.DataFrame(table, columns=["user", "item", *self.query_columns])
            frame = frame[frame.pop("evaluated") > 0].reset_index(drop=True)
            out["queries"] = frame.astype({"user": "int64", "item": "int64", "rank": "int64"})
            self.test_queries.reset()
        if self.test_rows.update_called:
            table = self.test_rows.compute().cpu().numpy()
            frame = pd.DataFrame(table, columns=["user", "item", "label", "logit"])
            out["rows"] = frame.astype({"user": "int64", "item": "int64", "label": "int8"})
            self.test_rows.reset()
        return out

    def set_item_statistics(
        self, popularity: torch.Tensor, vectors: torch.Tensor | None = None
    ) -> None:
        """Take the training data's item statistics
        (`recsys.data.protocol.EvaluationProtocol.item_statistics`): training interactions per
        item [num_items] and, when the spec has a multi-hot item feature, its vectors
        [num_items, V]. They travel in the checkpoint's state_dict."""
        if popularity.shape != self.item_popularity.shape:
            raise ValueError(
                f"item popularity of shape {tuple(popularity.shape)} for a model of "
                f"{self.spec.num_items} items"
            )
        if (vectors is None) != (self.item_vectors is None) or (
            vectors is not None and vectors.shape != self.item_vectors.shape
        ):
            expected = None if self.item_vectors is None else tuple(self.item_vectors.shape)
            got = None if vectors is None else tuple(vectors.shape)
            raise ValueError(f"item vectors of shape {got} for a model that expects {expected}")
        self.item_popularity.copy_(popularity)
        if vectors is not None:
            self.item_vectors.copy_(vectors.bool())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # checkpoints written before the item statistics were buffers: keep the current ones
        # (`set_item_statistics`); `_list_metrics` refuses to run on none
        for name in ("item_popularity", "item_vectors"):
            if prefix + name not in state_dict and getattr(self, name) is not None:
                state_dict[prefix + name] = getattr(self, name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _list_metrics(self, flat_lists: torch.Tensor) -> dict[str, float]:
        """Coverage, novelty, diversity (items with a multi-hot feature only) and
        personalization of the test top-K lists."""
        if not bool(self.item_popularity.any()):
            raise RuntimeError(
                "the module holds no item statistics of the training data (a checkpoint from "
                "an older recsys, or a module built without them): call "
                "module.set_item_statistics(**dm.protocol.item_statistics()) after dm.setup()"
            )
        k = min(self.hparams.list_k, self.spec.num_items)
        lists = flat_lists.long().view(-1, k).cpu()
        out = {
            f"test/coverage@{k}": catalogue_coverage(lists, self.spec.num_items),
            f"test/novelty@{k}": novelty(lists, self.item_popularity.cpu()),
        }
        # on the item feature's vectors, shared by every model; a model's own embeddings
        # would make each model's figure a distance in a space of its own
        if self.item_vectors is not None:
            vectors = self.item_vectors.float().cpu()
            out[f"test/diversity@{k}"] = intra_list_diversity(lists, vectors)
        if len(lists) > 1:
            out[f"test/personalization@{k}"] = personalization(lists, self.spec.num_items)
        return out

    def setup(self, stage: str) -> None:
        """A fit starts from the weights of other checkpoints when the network names them
        (`Pretrainable`: NeuMF's ``model.pretrained``): each file is read here, checked to be
        a checkpoint of the network the source names, and its network weights are handed to
        ``load_pretrained``. Here rather than in the network's constructor, so that
        ``load_from_checkpoint`` never reads those files; a resumed fit reads them too, then
        Lightning puts the checkpoint's weights over them."""
        if stage != "fit" or not isinstance(self.net, Pretrainable) or not self.net.pretrained:
            return
        weights = {}
        for source, path in self.net.pretrained.items():
            what = f"model.pretrained.{source}: {path}"
            if not Path(path).is_file():
                raise ValueError(f"{what} is not a file")
            expected = self.net.source_hparams(source)
            weights[source] = network_weights(load_weights_only(path), expected, what)
        self.net.load_pretrained(weights)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        """One optimizer as Lightning sees it (a `CombinedOptimizer` of the tables' and the
        other parameters' optimizers when ``sparse_optimizer`` is set), and the optional
        per-step ``lr_scheduler``. None for a network fitted in closed form: Lightning then
        runs the loop (validation, checkpoints, early stopping) without an optimizer."""
        if self.closed_form:
            return None
        if self.hparams.optimizer is None:
            raise ValueError("training needs model.optimizer (a partial torch optimizer config)")
        named = list(self.named_parameters())
        # tables whose optimizer runs fused in the backward pass (trainer=torchrec) step there
        params = [p for _, p in in_backward_optimizer_filter(named)]
        dense_opt = instantiate(self.hparams.optimizer)
        sparse_grad = isinstance(self.net, SparseGrad) and self.net.sparse_grad
        if sparse_grad and self.hparams.sparse_optimizer is None:
            raise ValueError(
                "model.sparse_grad=true makes the tables' gradients row-sparse, which "
                f"{self.hparams.optimizer['_target_']} does not take: set model.sparse_optimizer, "
                "e.g. model.sparse_optimizer='{_target_: recsys.lit.optim.RowSparseAdam, "
                "_partial_: true, lr: 0.001}' (torch.optim.SparseAdam and Adagrad take them too)"
            )
        if self.hparams.sparse_optimizer is None or len(params) < len(named):
            optimizer = dense_opt(params=params)
        else:
            tables = {id(p) for p in embedding_parameters(self.net)}
            if not tables:
                raise ValueError(
                    f"model.sparse_optimizer is set but {type(self.net).__name__} has no "
                    "embedding tables; set model.sparse_optimizer=null"
                )
            sparse_opt = instantiate(self.hparams.sparse_optimizer)
            optimizer = CombinedOptimizer(
                {
                    "sparse": sparse_opt(params=[p for p in params if id(p) in tables]),
                    "dense": dense_opt(params=[p for p in params if id(p) not in tables]),
                }
            )
        if self.hparams.lr_scheduler is None:
            return optimizer
        scheduler = instantiate(self.hparams.lr_scheduler)(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }


def network_weights(checkpoint: dict, expected: dict[str, Any], what: str) -> dict:
    """The network weights of a `RecommenderModule` checkpoint (its state_dict's ``net.``
    entries, the prefix removed), after checking that its hyperparameters hold ``expected``.

    Raises:
        ValueError: naming ``what`` (the file), when they do not.
    """
    hparams = checkpoint.get("hyper_parameters", {})
    found = {k: hparams.get(k) for k in expected}
    if found != expected:
        raise ValueError(
            f"{what} is a checkpoint of {_settings(found)}, not of {_settings(expected)}"
        )
    return {k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}


def _settings(hparams: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in hparams.items())


def embedding_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of the embedding tables (nn.Embedding(Bag), TorchRec collections)."""
    kinds = (nn.Embedding, nn.EmbeddingBag, EmbeddingBagCollection, EmbeddingCollection)
    tables = [m for m in module.modules() if isinstance(m, kinds)]
    return list({id(p): p for m in tables for p in m.parameters()}.values())
