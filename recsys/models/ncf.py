"""Neural Collaborative Filtering: GMF, MLP and their fusion NeuMF (He et al., WWW 2017),
and plain matrix factorisation (the dot-product baseline of Rendle et al., RecSys 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from recsys.data.batch import Batch
from recsys.data.spec import FeatureSpec
from recsys.models import common
from recsys.models.common import mlp, mlp_rest, mlp_rest_weights, require_ids

VARIANTS = ("gmf", "mlp", "neumf", "mf")


class NeuMF(nn.Module):
    """NeuMF over the ``user_id`` and ``item_id`` features of a `Batch`.

    Reads ``user_id`` and ``item_id`` only: no side, row or dense feature. Refuses data
    without ids (`require_ids`: click logs, whose features all belong to the row).

    Notation: B batch size, G GMF embedding dim, M MLP embedding dim, L last MLP width.

    - ``gmf``: logit = h . (p_u * q_i) + b with p_u, q_i in R^G.
    - ``mlp``: logit = h . MLP([p_u; q_i]) + b with p_u, q_i in R^M.
    - ``neumf``: logit = h . [p_u * q_i; MLP([p'_u; q'_i])] + b, separate embeddings per tower.
    - ``mf``: logit = p_u . q_i + b_u + b_i + b with p_u, q_i in R^G (no head: the weights of
      GMF's head fixed to ones; ``biases=False`` drops b_u and b_i).

    ``pretrained`` (``neumf`` only, He et al. Section 3.4.1): checkpoints of a ``gmf`` and an
    ``mlp`` run on the same data, e.g. ``{"gmf": ".../epoch_004.ckpt", "mlp": ...}``.
    `load_pretrained` copies their towers into this network and sets the head to
    ``[alpha * h_gmf; (1 - alpha) * h_mlp]`` with bias ``alpha * b_gmf + (1 - alpha) * b_mlp``,
    so the initial logit is ``alpha * gmf_logit + (1 - alpha) * mlp_logit``. The network does
    not read the files when it is built (a checkpoint of it rebuilds without them): the
    LightningModule calls `load_pretrained` when a fit starts from scratch.

    ``sparse_grad``: the tables' gradients are row-sparse (``nn.Embedding(sparse=True)``), one
    row per distinct user or item of the batch, in order: a step's work then depends on the
    batch, not on the number of users and items, with an optimizer that takes such gradients
    for the tables (``model.sparse_optimizer``, e.g. `recsys.lit.optim.RowSparseAdam`).

    Example::

            >>> import torch
            >>> from recsys.data import FeatureSpec
            >>> from recsys.data.store import FeatureStore
            >>> spec = FeatureSpec.of_ids(num_users=10, num_items=20)
            >>> users, items = torch.tensor([0, 3]), torch.tensor([5, 7])
            >>> batch = FeatureStore(spec, None, None).make_batch(users, items)
            >>> net = NeuMF(spec, variant="neumf", gmf_dim=8, mlp_dim=8, mlp_layers=[16, 8])
            >>> net(batch).shape  # logits [B]
            torch.Size([2])
    """

    def __init__(
        self,
        spec: FeatureSpec,
        variant: str = "neumf",
        gmf_dim: int = 32,
        mlp_dim: int = 32,
        mlp_layers: Sequence[int] = (64, 32, 16),
        dropout: float = 0.0,
        biases: bool = True,
        pretrained: Mapping[str, str] | None = None,
        alpha: float = 0.5,
        sparse_grad: bool = False,
    ):
        super().__init__()
        require_ids(spec, "ncf")
        if variant not in VARIANTS:
            raise ValueError(f"model.variant={variant!r} is not one of {VARIANTS}")
        if variant in ("mlp", "neumf") and not mlp_layers:
            raise ValueError("model.mlp_layers must name at least one layer for mlp/neumf")
        if pretrained is not None and (variant != "neumf" or set(pretrained) != {"gmf", "mlp"}):
            raise ValueError(
                f"model.pretrained={dict(pretrained)!r} with model.variant={variant!r}: "
                "pretraining takes model.variant=neumf and exactly the keys gmf and mlp "
                "(checkpoint paths), or null"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"model.alpha={alpha} must lie in [0, 1]")
        self.variant = variant
        self.pretrained = dict(pretrained) if pretrained is not None else None
        self.alpha = alpha
        self.sparse_grad = sparse_grad
        head_in = 0
        if variant in ("gmf", "neumf", "mf"):
            self.gmf_user = nn.Embedding(spec.num_users, gmf_dim, sparse=sparse_grad)
            self.gmf_item = nn.Embedding(spec.num_items, gmf_dim, sparse=sparse_grad)
            head_in += gmf_dim
        if variant in ("mlp", "neumf"):
            self.mlp_user = nn.Embedding(spec.num_users, mlp_dim, sparse=sparse_grad)
            self.mlp_item = nn.Embedding(spec.num_items, mlp_dim, sparse=sparse_grad)
            self.mlp = mlp(2 * mlp_dim, mlp_layers, dropout)
            head_in += mlp_layers[-1]
        if variant == "mf":
            self.bias = nn.Parameter(torch.zeros(()))
            if biases:
                self.user_bias = nn.Embedding(spec.num_users, 1, sparse=sparse_grad)
                self.item_bias = nn.Embedding(spec.num_items, 1, sparse=sparse_grad)
        else:
            self.head = nn.Linear(head_in, 1)
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.01)
        for name in ("user_bias", "item_bias"):
            if hasattr(self, name):
                nn.init.zeros_(getattr(self, name).weight)

    def _tower_weights(self, state: dict, variant: str) -> dict[str, torch.Tensor]:
        """The network weights (``net.`` prefix removed) of a RecommenderModule checkpoint of
        a NeuMF ``variant``."""
        hparams = state.get("hyper_parameters", {})
        net, found = hparams.get("net"), hparams.get("variant")
        if net != "recsys.models.NeuMF" or found != variant:
            raise ValueError(
                f"model.pretrained.{variant}: {self.pretrained[variant]} is a checkpoint of "
                f"{net} variant {found!r}, not of NeuMF variant {variant!r}"
            )
        return {k[4:]: v for k, v in state["state_dict"].items() if k.startswith("net.")}

    def item_embeddings(self) -> torch.Tensor:
        """Item vectors [num_items, G + M] (the towers' item tables side by side)."""
        tables = [getattr(self, n).weight for n in ("gmf_item", "mlp_item") if hasattr(self, n)]
        return torch.cat(tables, dim=1)

    # every variant's logit factors into a user part and an item part: `CatalogueScorer`
    factorised = True

    def item_part(self) -> dict:
        """What catalogue scoring needs that no request changes, computed once: the GMF item
        vectors times the head's GMF weights, transposed [G, I]; the item half of the first
        MLP layer, bias included [I, H1], its user half's weights, transposed [M, H1], the
        later layers' weights (`mlp_rest_weights`) and the head's MLP weights [L]; for ``mf``,
        the item vectors [I, G] and the item biases plus the global bias [I]."""
        if self.variant == "mf":
            bias = self.bias.expand(self.gmf_item.num_embeddings)
            if hasattr(self, "item_bias"):
                bias = bias + self.item_bias.weight[:, 0]
            return {"dot": self.gmf_item.weight, "item_bias": bias}
        out = {}
        h = self.head.weight[0]
        if self.variant in ("gmf", "neumf"):
            g = self.gmf_item.embedding_dim
            out["gmf"] = (self.gmf_item.weight * h[:g]).T.contiguous()
        if self.variant in ("mlp", "neumf"):
            first, m = self.mlp[0], self.mlp_item.embedding_dim
            out["mlp"] = self.mlp_item.weight @ first.weight[:, m:].T + first.bias
            out["mlp_user"] = first.weight[:, :m].T.contiguous()
            out["mlp_rest"] = mlp_rest_weights(self.mlp)
            out["mlp_head"] = h[self.gmf_item.embedding_dim :] if self.variant == "neumf" else h
        return out

    def score_catalogue(self, users: torch.Tensor, item_part: dict):
        """Logits [U, I] of users [U] against every item: the same function as `forward`,
        with the user halves computed once per user instead of once per pair."""
        # the tables' rows by indexing: a module call costs more than the lookup (about 10 us
        # of the 0.5 ms a NeuMF user takes on ml-1m)
        if "dot" in item_part:  # mf
            logits = self.gmf_user.weight[users] @ item_part["dot"].T + item_part["item_bias"]
            if hasattr(self, "user_bias"):
                logits = logits + self.user_bias.weight[users]
            return logits
        logits = self.head.bias
        if "gmf" in item_part:
            logits = logits + self.gmf_user.weight[users] @ item_part["gmf"]
        if "mlp" in item_part:
            user_half = self.mlp_user.weight[users] @ item_part["mlp_user"]  # [U, H1]
            hidden = mlp_rest(user_half, item_part["mlp"], item_part["mlp_rest"])  # [U * I, L]
            logits = logits + (hidden @ item_part["mlp_head"]).view(len(users), -1)
        return logits

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns: logits [B]."""
        # the distinct ids: for the MLP's first layer, and for row-sparse gradients (see `_rows`)
        distinct = self.sparse_grad or self.variant in ("mlp", "neumf")
        users = _Ids.of(batch.ids("user_id"), distinct)
        items = _Ids.of(batch.ids("item_id"), distinct)
        if self.variant == "mf":
            return self._mf(users, items)
        towers = []
        if self.variant in ("gmf", "neumf"):
            towers.append(_rows(self.gmf_user, users) * _rows(self.gmf_item, items))
        if self.variant in ("mlp", "neumf"):
            towers.append(self._mlp_tower(users, items))
        return self.head(torch.cat(towers, dim=1)).squeeze(1)

    def embedding_l2(self, batch: Batch) -> torch.Tensor:
        """The L2 penalty of the rows the batch looks up [scalar]: the mean over its pairs of
        the squared norms of each pair's user and item vectors in every tower (and, for
        ``mf``, its user and item biases). `RecommenderModule` adds ``model.l2`` times it to
        the loss, so a row is pulled towards zero in proportion to how often the batch uses
        it, as in the per-example update of Rendle et al. 2020 (their ``reg`` is twice
        ``model.l2``). Computed once per distinct id, weighted by its count."""
        penalty = []
        for key, side in (("user_id", "user"), ("item_id", "item")):
            names = (f"gmf_{side}", f"mlp_{side}", f"{side}_bias")
            tables = [getattr(self, n) for n in names if hasattr(self, n)]
            ids = batch.ids(key)
            if not common.host_reads_are_free(ids):  # the embedding op, as `_rows` takes
                penalty += [table(ids).square().sum() for table in tables]
                continue
            distinct, counts = torch.unique(ids, return_counts=True)
            rows = _Ids(ids, distinct)
            for table in tables:
                norms = _distinct_rows(table, rows).square().sum(1)
                penalty.append(counts.to(norms.dtype) @ norms)
        return torch.stack(penalty).sum() / len(batch)

    def _mlp_tower(self, users: _Ids, items: _Ids) -> torch.Tensor:
        """MLP([p'_u; q'_i]) [B, L], its first layer W [p'_u; q'_i] + b split into the user half
        W_u p'_u and the item half W_i q'_i + b, each computed once per distinct user and item
        of the batch and gathered per pair. The same function as the MLP on the concatenation,
        with fewer FLOPs: negative sampling repeats each user 1 + n times in a batch, and the
        first layer is the MLP's widest. On a GPU, where FLOPs are cheap and `torch.unique`
        waits for the device, the plain MLP on the concatenation."""
        if users.distinct is None:
            pairs = [_rows(self.mlp_user, users), _rows(self.mlp_item, items)]
            return self.mlp(torch.cat(pairs, dim=1))
        first, m = self.mlp[0], self.mlp_user.embedding_dim
        user_half = F.linear(_distinct_rows(self.mlp_user, users), first.weight[:, :m])
        item_half = F.linear(_distinct_rows(self.mlp_item, items), first.weight[:, m:], first.bias)
        # gathers by index_select: their backward is an index_add (see `_rows`)
        hidden = user_half.index_select(0, users.inverse) + item_half.index_select(0, items.inverse)
        return self.mlp[1:](hidden)

    def _mf(self, users: _Ids, items: _Ids) -> torch.Tensor:
        logits = (_rows(self.gmf_user, users) * _rows(self.gmf_item, items)).sum(1) + self.bias
        if hasattr(self, "user_bias"):
            logits = (
                logits + _rows(self.user_bias, users)[:, 0] + _rows(self.item_bias, items)[:, 0]
            )
        return logits

    @torch.no_grad()
    def load_pretrained(self, checkpoints: Mapping[str, dict]) -> None:
        """Initialise from the ``pretrained`` GMF and MLP checkpoints (see the class notes),
        read by the LightningModule: ``{"gmf": checkpoint, "mlp": checkpoint}`` as
        ``torch.load`` gives them.

        Raises:
            ValueError: a file is not a checkpoint of that variant, or one of its tensors
                differs in shape from this network's (other data, other dims or layers).
        """
        gmf = self._tower_weights(checkpoints["gmf"], "gmf")
        mlp_ = self._tower_weights(checkpoints["mlp"], "mlp")
        a = self.alpha
        head = {
            "head.weight": torch.cat([a * gmf["head.weight"], (1 - a) * mlp_["head.weight"]], 1),
            "head.bias": a * gmf["head.bias"] + (1 - a) * mlp_["head.bias"],
        }
        sources = [  # (file, name, tensor): the towers as they are, then the head
            *((self.pretrained["gmf"], n, v) for n, v in gmf.items() if n.startswith("gmf_")),
            *((self.pretrained["mlp"], n, v) for n, v in mlp_.items() if n.startswith("mlp")),
            *((" and ".join(self.pretrained.values()), n, v) for n, v in head.items()),
        ]
        own = self.state_dict()
        for path, name, value in sources:
            if name not in own or own[name].shape != value.shape:
                shape = tuple(own[name].shape) if name in own else "absent"
                raise ValueError(
                    f"model.pretrained: {path} gives {name} the shape {tuple(value.shape)}, "
                    f"this NeuMF's is {shape}: train the sources on the same data with the "
                    "same gmf_dim, mlp_dim and mlp_layers"
                )
        for _, name, value in sources:
            own[name].copy_(value)


class _Ids(NamedTuple):
    """A batch's ids of one kind: per pair [B] and, on the CPU where asked, the distinct ids
    (sorted) [D] and each pair's index among them [B]."""

    pairs: torch.Tensor
    distinct: torch.Tensor | None = None
    inverse: torch.Tensor | None = None

    @classmethod
    def of(cls, ids: torch.Tensor, distinct: bool) -> _Ids:
        if not distinct or not common.host_reads_are_free(ids):  # unique waits for a GPU
            return cls(ids)
        return cls(ids, *torch.unique(ids, return_inverse=True))


def _rows(table: nn.Embedding, ids: _Ids) -> torch.Tensor:
    """The pairs' rows of a table [B, D].

    - row-sparse gradients (``sparse_grad``) on the CPU: the distinct rows (`_distinct_rows`:
      a gradient with each row once, in order), gathered per pair;
    - dense gradients on the CPU: ``index_select``, whose backward (an index_add) is 1.3-2x as
      fast there as the embedding's (a sort and a segment sum) at training batch sizes;
    - on a GPU the embedding op: an index_add's atomics would make the gradients
      order-dependent.
    """
    if not common.host_reads_are_free(ids.pairs):
        return table(ids.pairs)
    if table.sparse:
        return _distinct_rows(table, ids).index_select(0, ids.inverse)
    return table.weight.index_select(0, ids.pairs)


def _distinct_rows(table: nn.Embedding, ids: _Ids) -> torch.Tensor:
    """The rows of the distinct ids [D, dim]; with ``sparse_grad`` their gradient is row-sparse
    with distinct rows in order (`_CoalescedRows`)."""
    if table.sparse:
        return _CoalescedRows.apply(table.weight, ids.distinct)
    return table.weight.index_select(0, ids.distinct)


class _CoalescedRows(torch.autograd.Function):
    """``weight[rows]`` for sorted distinct ``rows``, with a row-sparse gradient over those rows:
    coalesced in content, so `recsys.lit.optim.RowSparseAdam` skips its ``coalesce`` (a sort
    and a segment sum of every gradient row: about 5 ms per table for 20K rows of 64 floats on
    this project's CPU, as the embedding op's gradient, a row per pair, needs). The gradient
    is marked coalesced, but autograd's accumulation into ``.grad`` drops the mark, so the
    optimizer checks the order of the rows instead."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.size = weight.shape
        return weight.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (rows,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(
            rows[None], grad, ctx.size, is_coalesced=True, check_invariants=False
        ), None
