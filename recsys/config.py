"""OmegaConf resolvers that ``conf/`` uses; importing ``recsys`` registers them, so train.py and
tests that compose the config after importing the package resolve it."""

from __future__ import annotations

from omegaconf import OmegaConf


def default_monitor(ranking: str | None) -> str:
    """The validation metric that selects the best checkpoint, stops early and is returned to
    a sweeper, for ``data.ranking``: ``val/ndcg@10`` with a ranking evaluation (sampled or
    full), else ``val/auroc``; both are maximised."""
    return "val/ndcg@10" if ranking else "val/auroc"


OmegaConf.register_new_resolver("recsys.monitor", default_monitor, replace=True)
