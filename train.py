"""Train a recommender: ``python train.py data=movielens model=ncf`` (see README.md)."""

import hydra
from omegaconf import DictConfig

from recsys.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run(cfg)
    # what a Hydra sweeper optimises
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
