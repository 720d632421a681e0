"""python -m recsys.serve ckpt_path=... : serve a checkpoint over HTTP (conf/serve.yaml)."""

import hydra
from omegaconf import DictConfig

from recsys.errors import exit_on_user_error
from recsys.serve import run


@hydra.main(version_base="1.3", config_path="../../conf", config_name="serve")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
