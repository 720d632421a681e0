"""Recommend: ``python predict.py ckpt_path=<ckpt> user_ids=[1,2] k=10`` (or ``similar_to=1``)."""

import hydra
from omegaconf import DictConfig

from recsys.console import load_task
from recsys.errors import exit_on_user_error  # importing recsys registers conf/'s resolvers


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    load_task("predict")(cfg)  # torch loads after --help has answered


if __name__ == "__main__":
    main()
