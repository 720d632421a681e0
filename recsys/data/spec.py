"""What a dataset offers a model: sparse (categorical, multi-hot) and dense features."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Entity = Literal["user", "item"]


@dataclass(frozen=True)
class SparseFeature:
    """A categorical feature of a user or an item.

    ``num_embeddings`` counts every code the feature can take; for side features code 0 means
    missing or unknown. ``multi_hot`` features (genres) have a variable number of codes per row.
    """

    name: str
    entity: Entity
    num_embeddings: int
    multi_hot: bool = False


@dataclass(frozen=True)
class DenseFeature:
    """A standardised float feature of a user or an item."""

    name: str
    entity: Entity


@dataclass(frozen=True)
class FeatureSpec:
    """Sizes and features of a processed dataset, passed to every model.

    The sparse features always start with ``user_id`` (``num_users`` codes) and ``item_id``
    (``num_items`` codes); their order is the key order of ``Batch.sparse_features``.
    """

    num_users: int
    num_items: int
    sparse: tuple[SparseFeature, ...] = field(default_factory=tuple)
    dense: tuple[DenseFeature, ...] = field(default_factory=tuple)

    @classmethod
    def of_ids(
        cls,
        num_users: int,
        num_items: int,
        side: tuple[SparseFeature, ...] = (),
        dense: tuple[DenseFeature, ...] = (),
    ) -> FeatureSpec:
        """The spec of ``num_users`` x ``num_items`` codes: ``user_id`` and ``item_id``,
        then the ``side`` features.

        Example::

            >>> FeatureSpec.of_ids(10, 20).sparse_names
            ['user_id', 'item_id']
        """
        ids = (
            SparseFeature("user_id", "user", num_users),
            SparseFeature("item_id", "item", num_items),
        )
        return cls(num_users, num_items, sparse=(*ids, *side), dense=tuple(dense))

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def num_dense(self) -> int:
        return len(self.dense)

    def side_features(self) -> tuple[SparseFeature, ...]:
        """Sparse features other than the user and item ids."""
        return tuple(f for f in self.sparse if f.name not in ("user_id", "item_id"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(
            num_users=int(d["num_users"]),
            num_items=int(d["num_items"]),
            sparse=tuple(SparseFeature(**f) for f in d["sparse"]),
            dense=tuple(DenseFeature(**f) for f in d["dense"]),
        )
