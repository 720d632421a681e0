"""Config helpers: the OmegaConf resolvers that ``conf/`` uses (importing ``recsys`` registers
them, so train.py and tests that compose the config after importing the package resolve it),
and `plain` for values that come from Hydra."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf


def plain(value: Any) -> Any:
    """A plain dict/list copy of a (Hydra) mapping or sequence: for hyperparameters that
    ``weights_only`` loading reads, settings and comparisons."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [plain(v) for v in value]
    return value


def default_monitor(ranking: str | None) -> str:
    """The validation metric that selects the best checkpoint, stops early and is returned to
    a sweeper, for ``data.ranking``: ``val/ndcg@10`` with a ranking evaluation (sampled or
    full), else ``val/auroc``; both are maximised."""
    return "val/ndcg@10" if ranking else "val/auroc"


OmegaConf.register_new_resolver("recsys.monitor", default_monitor, replace=True)
