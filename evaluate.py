"""Evaluate a checkpoint: ``python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt``."""

import hydra
from omegaconf import DictConfig

import recsys  # noqa: F401  (the OmegaConf resolvers that conf/ uses)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from recsys.evaluate import run  # Lightning and torch load after --help has answered

    run(cfg)


if __name__ == "__main__":
    main()
