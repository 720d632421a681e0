"""Datasets: one DataModule per source, shared preprocessing, the batch type."""

from recsys.data.base import RecDataModule
from recsys.data.batch import Batch
from recsys.data.books import BookCrossingDataModule
from recsys.data.csv import CSVDataModule
from recsys.data.movielens import MovieLensDataModule
from recsys.data.spec import DenseFeature, FeatureSpec, SparseFeature
from recsys.data.synthetic import SyntheticDataModule

__all__ = [
    "Batch",
    "BookCrossingDataModule",
    "CSVDataModule",
    "DenseFeature",
    "FeatureSpec",
    "MovieLensDataModule",
    "RecDataModule",
    "SparseFeature",
    "SyntheticDataModule",
]
