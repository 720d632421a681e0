"""recsys: deep-learning recommender experiments on Lightning, Hydra and TorchRec."""

from recsys import config  # noqa: F401  (registers the OmegaConf resolvers conf/ uses)
