"""Recommend: ``python predict.py ckpt_path=<ckpt> user_ids=[1,2] k=10`` (or ``similar_to=1``)."""

import hydra
from omegaconf import DictConfig

import recsys  # noqa: F401  (the OmegaConf resolvers that conf/ uses)


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from recsys.predict import run  # torch loads after --help has answered

    run(cfg)


if __name__ == "__main__":
    main()
