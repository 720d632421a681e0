"""Models: plain `nn.Module`s that map a `Batch` to logits [B]."""

from recsys.models.ncf import NeuMF

__all__ = ["NeuMF"]
