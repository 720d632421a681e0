"""Evaluate a checkpoint: ``python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt``."""

import hydra
from omegaconf import DictConfig

from recsys.console import load_task
from recsys.errors import exit_on_user_error  # importing recsys registers conf/'s resolvers


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    load_task("evaluate")(cfg)  # torch and Lightning load after --help has answered


if __name__ == "__main__":
    main()
