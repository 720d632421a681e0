"""LightningModules: losses, metrics and optimizers around the plain models."""

from recsys.lit.module import RecommenderModule

__all__ = ["RecommenderModule"]
