"""Evaluation metrics: ranking accuracy, beyond-accuracy list metrics, serving cost."""

from recsys.metrics.ranking import (
    RankingMetrics,
    catalogue_coverage,
    intra_list_diversity,
    latency_percentiles,
    novelty,
    peak_memory_mb,
    personalization,
)

__all__ = [
    "RankingMetrics",
    "catalogue_coverage",
    "intra_list_diversity",
    "latency_percentiles",
    "novelty",
    "peak_memory_mb",
    "personalization",
]
