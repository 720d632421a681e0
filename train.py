"""Train a recommender: ``python train.py data=movielens model=ncf`` (see README.md)."""

import logging

import hydra
from omegaconf import DictConfig

from recsys.console import load_task
from recsys.errors import exit_on_user_error  # importing recsys registers conf/'s resolvers

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    # torch, Lightning and TorchRec load once Hydra has parsed the command line: --help
    # answers at once
    metrics = load_task("train")(cfg)
    # what a Hydra sweeper optimises: the figure at the best checkpoint
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        log.warning(
            "optimized_metric=%s is not among this run's metrics (%s): nothing to return to a "
            "sweeper; set optimized_metric= (or monitor=) to one of them",
            name,
            ", ".join(sorted(metrics)),
        )
        return None
    return metrics[name]


if __name__ == "__main__":
    main()
