"""What a dataset offers a model: sparse (categorical, multi-hot) and dense features, each
describing a user, an item or the interaction row itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

# whom a feature describes: a user or an item (constant per id, looked up by code), or the
# interaction row (an impression's own context, as every feature of a click log)
Entity = Literal["user", "item", "row"]
ENTITIES = ("user", "item", "row")


@dataclass(frozen=True)
class SparseFeature:
    """A categorical feature of a user, an item or the row.

    ``num_embeddings`` counts every code the feature can take; for every feature but the ids
    code 0 means missing or unknown. ``multi_hot`` features (genres) have a variable number
    of codes per row.
    """

    name: str
    entity: Entity
    num_embeddings: int
    multi_hot: bool = False


@dataclass(frozen=True)
class DenseFeature:
    """A float feature of a user, an item or the row (standardised, or log-transformed
    counts for click logs)."""

    name: str
    entity: Entity


@dataclass(frozen=True)
class FeatureSpec:
    """Sizes and features of a processed dataset, passed to every model.

    User-item data (`has_ids`): the sparse features start with ``user_id`` (``num_users``
    codes) and ``item_id`` (``num_items`` codes). Click logs have neither (``num_users`` and
    ``num_items`` are 0): every feature belongs to the row. The order of ``sparse`` is the key
    order of ``Batch.sparse_features``; that of ``dense`` the columns of
    ``Batch.dense_features``.
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
        then the ``side`` features (of users, items or rows); ``dense`` in entity order
        (users', items', then the row's), the column order of ``Batch.dense_features``.

        Example::

            >>> FeatureSpec.of_ids(10, 20).sparse_names
            ['user_id', 'item_id']
        """
        ids = (
            SparseFeature("user_id", "user", num_users),
            SparseFeature("item_id", "item", num_items),
        )
        dense = tuple(sorted(dense, key=lambda d: ENTITIES.index(d.entity)))
        return cls(num_users, num_items, sparse=(*ids, *side), dense=dense)

    @classmethod
    def of_rows(
        cls, sparse: tuple[SparseFeature, ...], dense: tuple[DenseFeature, ...] = ()
    ) -> FeatureSpec:
        """The spec of data whose rows carry every feature and no user or item id (a click
        log such as Criteo's)."""
        for f in (*sparse, *dense):
            if f.entity != "row":
                raise ValueError(f"feature {f.name!r} describes a {f.entity}, not the row")
        return cls(0, 0, sparse=tuple(sparse), dense=tuple(dense))

    @property
    def has_ids(self) -> bool:
        """Whether rows name a user and an item (``user_id``, ``item_id``): what ranking,
        negative sampling, recommendations and the factorised models need."""
        return "user_id" in self.sparse_names

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def num_dense(self) -> int:
        return len(self.dense)

    def side_features(self) -> tuple[SparseFeature, ...]:
        """Sparse features of users and items other than their ids."""
        return tuple(
            f for f in self.sparse if f.entity != "row" and f.name not in ("user_id", "item_id")
        )

    def row_features(self) -> tuple[SparseFeature, ...]:
        """Sparse features of the row."""
        return tuple(f for f in self.sparse if f.entity == "row")

    def dense_of(self, entity: Entity) -> tuple[DenseFeature, ...]:
        return tuple(d for d in self.dense if d.entity == entity)

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
