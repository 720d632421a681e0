"""Models: plain `nn.Module`s that map a `Batch` to logits [B]."""

from recsys.models.dlrm import DLRM
from recsys.models.hybrid import Hybrid
from recsys.models.linear import LogisticRegression
from recsys.models.mf import MF
from recsys.models.ncf import NeuMF
from recsys.models.neighbors import EASE, ItemKNN
from recsys.models.popularity import Popularity

__all__ = [
    "DLRM",
    "EASE",
    "MF",
    "Hybrid",
    "ItemKNN",
    "LogisticRegression",
    "NeuMF",
    "Popularity",
]
