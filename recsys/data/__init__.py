"""Datasets: one DataModule per source, shared preprocessing, the batch type."""

from recsys.data.base import RecDataModule
from recsys.data.batch import Batch
from recsys.data.books import BookCrossingDataModule
from recsys.data.criteo import CriteoDataModule
from recsys.data.csv import CSVDataModule
from recsys.data.movielens import MovieLensDataModule
from recsys.data.spec import DenseFeature, FeatureSpec, SparseFeature

__all__ = [
    "Batch",
    "BookCrossingDataModule",
    "CSVDataModule",
    "CriteoDataModule",
    "DenseFeature",
    "FeatureSpec",
    "MovieLensDataModule",
    "RecDataModule",
    "SparseFeature",
    "SyntheticDataModule",
]


def __getattr__(name: str):
    # imported when first named, so that `python -m recsys.data.synthetic` runs the module once
    if name == "SyntheticDataModule":
        from recsys.data.synthetic import SyntheticDataModule

        return SyntheticDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
