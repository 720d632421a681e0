"""Neural Collaborative Filtering (He et al., WWW 2017): a GMF tower, an MLP tower and a linear
head, composed as GMF, MLP or their fusion NeuMF."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from recsys.data.batch import Batch
from recsys.data.spec import FeatureSpec
from recsys.models import ops
from recsys.models.common import mlp, mlp_rest, mlp_rest_weights, rename_keys, require_ids
from recsys.models.ops import Ids

VARIANTS = ("gmf", "mlp", "neumf")
NET = "recsys.models.NeuMF"
# state_dict names before the towers were modules of their own -> today's
LEGACY_NAMES = (
    (r"^gmf_(user|item)\.", r"gmf.\1."),
    (r"^mlp_(user|item)\.", r"mlp.\1."),
    (r"^mlp\.(\d+)\.", r"mlp.layers.\1."),
)


class GMFTower(nn.Module):
    """Generalised matrix factorisation: p_u * q_i [B, G], the element-wise product of a user's
    and an item's vectors (G the embedding dim)."""

    def __init__(self, num_users: int, num_items: int, dim: int, sparse: bool = False):
        super().__init__()
        self.user = nn.Embedding(num_users, dim, sparse=sparse)
        self.item = nn.Embedding(num_items, dim, sparse=sparse)

    def forward(self, users: Ids, items: Ids) -> torch.Tensor:
        """Returns: [B, G]."""
        return ops.rows(self.user, users) * ops.rows(self.item, items)

    def item_part(self, head: torch.Tensor) -> torch.Tensor:
        """The item vectors times the head's weights ``head`` [G], transposed [G, I]."""
        return (self.item.weight * head).T.contiguous()

    def score_catalogue(self, users: torch.Tensor, item_part: torch.Tensor) -> torch.Tensor:
        """The head's GMF term [U, I] for users [U] and every item (`item_part`)."""
        # the rows by indexing: a module call costs more than the lookup
        return self.user.weight[users] @ item_part


class MLPTower(nn.Module):
    """MLP([p'_u; q'_i]) [B, L] over the concatenated user and item vectors (M the embedding
    dim, L the last layer's width).

    On the CPU, with the distinct ids of the batch (`Ids`), its first layer runs on the user
    and item halves apart (`ops.pair_linear`); elsewhere the plain MLP on the concatenation,
    where FLOPs are cheap and ``torch.unique`` waits for the device.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        dim: int,
        layers: Sequence[int],
        dropout: float = 0.0,
        sparse: bool = False,
    ):
        super().__init__()
        self.user = nn.Embedding(num_users, dim, sparse=sparse)
        self.item = nn.Embedding(num_items, dim, sparse=sparse)
        self.layers = mlp(2 * dim, layers, dropout)

    def forward(self, users: Ids, items: Ids) -> torch.Tensor:
        """Returns: [B, L]."""
        if users.distinct is None:
            pairs = [ops.rows(self.user, users), ops.rows(self.item, items)]
            return self.layers(torch.cat(pairs, dim=1))
        user_rows = ops.distinct_rows(self.user, users)
        item_rows = ops.distinct_rows(self.item, items)
        first = ops.pair_linear(self.layers[0], users, items, user_rows, item_rows)
        return self.layers[1:](first)

    def item_part(self) -> dict:
        """The item half of the first layer, bias included [I, H1], its user half's weights,
        transposed [M, H1], and the later layers' weights (`mlp_rest_weights`)."""
        first, m = self.layers[0], self.item.embedding_dim
        return {
            "mlp": self.item.weight @ first.weight[:, m:].T + first.bias,
            "mlp_user": first.weight[:, :m].T.contiguous(),
            "mlp_rest": mlp_rest_weights(self.layers),
        }

    def score_catalogue(self, users: torch.Tensor, item_part: dict) -> torch.Tensor:
        """The last layer's output [U * I, L] for users [U] and every item (`item_part`), row
        u * I + i."""
        user_half = self.user.weight[users] @ item_part["mlp_user"]  # [U, H1]
        return mlp_rest(user_half, item_part["mlp"], item_part["mlp_rest"])


class NeuMF(nn.Module):
    """NeuMF over the ``user_id`` and ``item_id`` features of a `Batch`.

    Reads ``user_id`` and ``item_id`` only: no side, row or dense feature. Refuses data
    without ids (`require_ids`: click logs, whose features all belong to the row).

    Notation: B batch size, G GMF embedding dim, M MLP embedding dim, L last MLP width.

    - ``gmf``: logit = h . (p_u * q_i) + b with p_u, q_i in R^G (`GMFTower`).
    - ``mlp``: logit = h . MLP([p_u; q_i]) + b with p_u, q_i in R^M (`MLPTower`).
    - ``neumf``: logit = h . [p_u * q_i; MLP([p'_u; q'_i])] + b, separate embeddings per tower.

    The dot product with biases (Rendle et al. 2020) is `recsys.models.MF`.

    ``pretrained`` (``neumf`` only, He et al. Section 3.4.1): checkpoints of a ``gmf`` and an
    ``mlp`` run on the same data, e.g. ``{"gmf": ".../epoch_004.ckpt", "mlp": ...}``. When a
    fit starts from scratch, the LightningModule reads them and hands their weights to
    `load_pretrained`, which copies their towers into this network and sets the head to
    ``[alpha * h_gmf; (1 - alpha) * h_mlp]`` with bias ``alpha * b_gmf + (1 - alpha) * b_mlp``,
    so the initial logit is ``alpha * gmf_logit + (1 - alpha) * mlp_logit``. A checkpoint of
    this network rebuilds without those files.

    ``sparse_grad``: the tables' gradients are row-sparse (``nn.Embedding(sparse=True)``), one
    row per distinct user or item of the batch, in order (`ops.rows`): a step's work then
    depends on the batch, not on the number of users and items, with an optimizer that takes
    such gradients for the tables (``model.sparse_optimizer``, e.g.
    `recsys.lit.optim.RowSparseAdam`).

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

    # every variant's logit factors into a user part and an item part: `CatalogueScorer`
    factorised = True

    def __init__(
        self,
        spec: FeatureSpec,
        variant: str = "neumf",
        gmf_dim: int = 32,
        mlp_dim: int = 32,
        mlp_layers: Sequence[int] = (64, 32, 16),
        dropout: float = 0.0,
        pretrained: Mapping[str, str] | None = None,
        alpha: float = 0.5,
        sparse_grad: bool = False,
    ):
        super().__init__()
        require_ids(spec, "ncf")
        if variant == "mf":
            raise ValueError(
                "model.variant=mf: matrix factorisation is a model of its own, "
                "recsys.models.MF: use model=mf (its size is model.embedding_dim)"
            )
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
        users, items = spec.num_users, spec.num_items
        self.gmf = GMFTower(users, items, gmf_dim, sparse_grad) if variant != "mlp" else None
        self.mlp = (
            MLPTower(users, items, mlp_dim, mlp_layers, dropout, sparse_grad)
            if variant != "gmf"
            else None
        )
        gmf_width = gmf_dim if variant != "mlp" else 0
        self.head = nn.Linear(gmf_width + (mlp_layers[-1] if variant != "gmf" else 0), 1)
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.01)

    @property
    def towers(self) -> list[GMFTower | MLPTower]:
        """The variant's towers, in the order of the head's inputs."""
        return [t for t in (self.gmf, self.mlp) if t is not None]

    def ids(self, batch: Batch) -> tuple[Ids, Ids]:
        """The batch's users and items, with their distinct ids on the CPU where a tower uses
        them: for the MLP's first layer, and for row-sparse gradients (`ops.rows`)."""
        distinct = self.sparse_grad or self.mlp is not None
        return Ids.of(batch.ids("user_id"), distinct), Ids.of(batch.ids("item_id"), distinct)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns: logits [B]."""
        users, items = self.ids(batch)
        towers = [tower(users, items) for tower in self.towers]
        return self.head(torch.cat(towers, dim=1)).squeeze(1)

    def embedding_l2(self, batch: Batch) -> torch.Tensor:
        """The L2 penalty of the rows the batch looks up [scalar]: the mean over its pairs of
        the squared norms of each pair's user and item vectors in every tower.
        `RecommenderModule` adds ``model.l2`` times it to the loss, so a row is pulled towards
        zero in proportion to how often the batch uses it, as in the per-example update of
        Rendle et al. 2020 (their ``reg`` is twice ``model.l2``)."""
        towers = self.towers
        penalty = ops.squared_norms([t.user for t in towers], batch.ids("user_id"))
        penalty += ops.squared_norms([t.item for t in towers], batch.ids("item_id"))
        return torch.stack(penalty).sum() / len(batch)

    def item_embeddings(self) -> torch.Tensor:
        """Item vectors [num_items, G + M] (the towers' item tables side by side)."""
        return torch.cat([t.item.weight for t in self.towers], dim=1)

    def item_part(self) -> dict:
        """What catalogue scoring needs that no request changes, computed once: the GMF
        tower's (`GMFTower.item_part`) under ``gmf``, the MLP tower's (`MLPTower.item_part`)
        and the head's MLP weights [L] under ``mlp_head``."""
        out = {}
        h = self.head.weight[0]
        g = self.gmf.item.embedding_dim if self.gmf is not None else 0
        if self.gmf is not None:
            out["gmf"] = self.gmf.item_part(h[:g])
        if self.mlp is not None:
            out.update(self.mlp.item_part())
            out["mlp_head"] = h[g:]
        return out

    def score_catalogue(self, users: torch.Tensor, item_part: dict) -> torch.Tensor:
        """Logits [U, I] of users [U] against every item: the same function as `forward`,
        with the user halves computed once per user instead of once per pair. Each tower's
        term is added where ``item_part`` holds its part (`recsys.retrieval` scores the GMF
        tower alone)."""
        logits = self.head.bias
        if "gmf" in item_part:
            logits = logits + self.gmf.score_catalogue(users, item_part["gmf"])
        if "mlp_user" in item_part:
            hidden = self.mlp.score_catalogue(users, item_part)  # [U * I, L]
            logits = logits + (hidden @ item_part["mlp_head"]).view(len(users), -1)
        return logits

    def source_hparams(self, source: str) -> dict[str, Any]:
        """A ``pretrained`` source (``gmf``, ``mlp``) is a checkpoint of NeuMF of that
        variant."""
        return {"net": NET, "variant": source}

    @torch.no_grad()
    def load_pretrained(self, weights: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Initialise from the network weights of the ``pretrained`` GMF and MLP runs (see the
        class notes): ``{"gmf": state_dict, "mlp": state_dict}``, as the LightningModule
        hands them (names of any earlier layout are renamed).

        Raises:
            ValueError: one of their tensors differs in shape from this network's (other
                data, other dims or layers).
        """
        gmf = rename_keys(dict(weights["gmf"]), LEGACY_NAMES)
        mlp_ = rename_keys(dict(weights["mlp"]), LEGACY_NAMES)
        a = self.alpha
        head = {
            "head.weight": torch.cat([a * gmf["head.weight"], (1 - a) * mlp_["head.weight"]], 1),
            "head.bias": a * gmf["head.bias"] + (1 - a) * mlp_["head.bias"],
        }
        sources = [  # (file, name, tensor): the towers as they are, then the head
            *((self.pretrained["gmf"], n, v) for n, v in gmf.items() if n.startswith("gmf.")),
            *((self.pretrained["mlp"], n, v) for n, v in mlp_.items() if n.startswith("mlp.")),
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

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        rename_keys(state_dict, LEGACY_NAMES, prefix)  # checkpoints of earlier versions
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def upgrade_hparams(net: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The network and keyword arguments of earlier NeuMF checkpoints and configs as this
    version takes them: ``variant=mf`` is `recsys.models.MF` (``gmf_dim`` its
    ``embedding_dim``), and the other variants drop ``biases`` (it applied to ``mf`` alone).
    Anything else is returned as it is."""
    if net not in (NET, "recsys.models.ncf.NeuMF"):
        return net, kwargs
    if kwargs.get("variant") != "mf":
        return net, {k: v for k, v in kwargs.items() if k != "biases"}
    if kwargs.get("pretrained") is not None:
        raise ValueError(
            f"model.pretrained={kwargs['pretrained']!r} with model.variant=mf: pretraining "
            "takes model=ncf model.variant=neumf"
        )
    neumf_only = {"variant", "mlp_dim", "mlp_layers", "dropout", "pretrained", "alpha"}
    out = {k: v for k, v in kwargs.items() if k not in neumf_only}
    if "gmf_dim" in out:
        out["embedding_dim"] = out.pop("gmf_dim")
    return "recsys.models.MF", out
