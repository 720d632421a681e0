"""DLRM (Naumov et al., 2019) on TorchRec: embedding bags, dense arch, interaction, over arch."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn
from torchrec.models.dlrm import DLRM as TorchRecDLRM
from torchrec.models.dlrm import DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys.data.batch import Batch
from recsys.data.spec import FeatureSpec

INTERACTIONS = ("dot", "dcn")
POOLINGS = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
_TABLE_DEVICE: ContextVar[str | None] = ContextVar("table_device", default=None)


@contextmanager
def tables_on(device: torch.device | str | None) -> Iterator[None]:
    """`embedding_bags` called inside (without a ``device``) make their tables on ``device``:
    ``"meta"`` under trainer=torchrec, whose sharding then allocates each rank's shards only.
    The device is no argument of the model, so it never reaches hyperparameters."""
    token = _TABLE_DEVICE.set(device)
    try:
        yield
    finally:
        _TABLE_DEVICE.reset(token)


def embedding_bags(
    spec: FeatureSpec,
    embedding_dim: int,
    pooling: str = "sum",
    feature_pooling: Mapping[str, str] | None = None,
    features: Sequence[str] | None = None,
    device: torch.device | str | None = None,
) -> EmbeddingBagCollection:
    """One table per sparse feature of ``spec`` (or of ``features``), sized by the spec.

    Args:
        pooling: ``sum`` or ``mean``, for every feature unless ``feature_pooling`` names it.
        device: where the tables are made; ``"meta"`` makes them without memory (sharding).
            None: that of the enclosing `tables_on`, else the CPU.
    """
    feature_pooling = dict(feature_pooling or {})
    names = list(features) if features is not None else spec.sparse_names
    unknown = set(feature_pooling) - set(names)
    if unknown:
        raise ValueError(
            f"model.feature_pooling names unknown features {sorted(unknown)}; features are {names}"
        )
    tables = []
    for f in spec.sparse:
        if f.name not in names:
            continue
        mode = feature_pooling.get(f.name, pooling)
        if mode not in POOLINGS:
            raise ValueError(f"pooling {mode!r} for {f.name!r} is not one of {list(POOLINGS)}")
        tables.append(
            EmbeddingBagConfig(
                name=f"t_{f.name}",
                embedding_dim=embedding_dim,
                num_embeddings=f.num_embeddings,
                feature_names=[f.name],
                pooling=POOLINGS[mode],
            )
        )
    return EmbeddingBagCollection(
        tables=tables, device=torch.device(device or _TABLE_DEVICE.get() or "cpu")
    )


class DLRM(nn.Module):
    """DLRM over every sparse and dense feature of a `Batch`.

    Reads everything the spec has: the ids, the users' and items' side features and the row's
    own, sparse and dense; data without ids (click logs) included.

    Notation: B batch size, F sparse features, D embedding dim, Dd dense features.

    Sparse arch: one `EmbeddingBagCollection` table per feature, pooled (sum or mean) to
    [B, F, D]. Dense arch: MLP [B, Dd] -> [B, D]. Interaction: pairwise dot products of the
    F + 1 vectors (``dot``) or TorchRec's low-rank DCN cross network (``dcn``). Over arch:
    MLP to one logit.

    ``sparse_grad``: the tables' gradients are row-sparse (their ``nn.EmbeddingBag`` modules
    with ``sparse=True``), for an optimizer that takes them (``model.sparse_optimizer``:
    Adagrad does): a step's cost then depends on the batch, not on the tables' sizes. Under
    trainer=torchrec the sharded tables update themselves in the backward pass instead.

    Example::

            >>> import torch
            >>> from recsys.data import FeatureSpec
            >>> from recsys.data.store import FeatureStore
            >>> spec = FeatureSpec.of_ids(num_users=10, num_items=20)
            >>> users, items = torch.tensor([0, 3]), torch.tensor([5, 7])
            >>> batch = FeatureStore(spec, None, None).make_batch(users, items)
            >>> net = DLRM(spec, embedding_dim=16, dense_arch_layers=[32, 16], over_arch_layers=[8])
            >>> net(batch).shape  # logits [B]
            torch.Size([2])
    """

    def __init__(
        self,
        spec: FeatureSpec,
        embedding_dim: int = 32,
        dense_arch_layers: Sequence[int] = (64, 32),
        over_arch_layers: Sequence[int] = (128, 64),
        interaction: str = "dot",
        pooling: str = "sum",
        feature_pooling: Mapping[str, str] | None = None,
        dcn_num_layers: int = 3,
        dcn_low_rank_dim: int = 16,
        sparse_grad: bool = False,
        device: str | None = None,
    ):
        super().__init__()
        if interaction not in INTERACTIONS:
            raise ValueError(f"model.interaction={interaction!r} is not one of {INTERACTIONS}")
        if not dense_arch_layers or dense_arch_layers[-1] != embedding_dim:
            raise ValueError(
                f"model.dense_arch_layers={list(dense_arch_layers)} must end in "
                f"model.embedding_dim={embedding_dim} (the dense vector joins the interaction)"
            )
        ebc = embedding_bags(spec, embedding_dim, pooling, feature_pooling, device=device)
        self.sparse_grad = sparse_grad
        for table in ebc.embedding_bags.values():
            table.sparse = sparse_grad
        # DLRM needs a dense input; a dataset without dense features gets one constant column
        self.num_dense = spec.num_dense
        layers = dict(
            embedding_bag_collection=ebc,
            dense_in_features=max(spec.num_dense, 1),
            dense_arch_layer_sizes=list(dense_arch_layers),
            over_arch_layer_sizes=[*over_arch_layers, 1],
        )
        if interaction == "dot":
            self.dlrm = TorchRecDLRM(**layers)
        else:
            self.dlrm = DLRM_DCN(
                **layers, dcn_num_layers=dcn_num_layers, dcn_low_rank_dim=dcn_low_rank_dim
            )

    def item_embeddings(self) -> torch.Tensor:
        """Item id vectors [num_items, D] (the ``item_id`` table)."""
        return self.dlrm.sparse_arch.embedding_bag_collection.embedding_bags["t_item_id"].weight

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns: logits [B]."""
        dense = batch.dense_features
        if self.num_dense == 0:
            dense = torch.ones(len(batch), 1, device=dense.device)
        return self.dlrm(dense, batch.sparse_features).squeeze(1)
