"""Evaluate a checkpoint: ``python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt``."""

import hydra
from omegaconf import DictConfig

from recsys.evaluate import run


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
