"""Train a recommender: ``python train.py data=movielens model=ncf`` (see README.md)."""

import hydra
from omegaconf import DictConfig

from recsys.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run(cfg)
    # what a Hydra sweeper optimises: the figure at the best checkpoint
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise ValueError(
            f"optimized_metric={name} is not among this run's metrics "
            f"({', '.join(sorted(metrics))}): set optimized_metric= (or monitor=) to one of them"
        )
    return metrics[name]


if __name__ == "__main__":
    main()
