"""python -m recsys.dashboard run_dir=<run folder> | ckpt_path=<ckpt> [runs=[...]]
[serve.port=8501]: the Streamlit dashboard (conf/dashboard.yaml)."""

import hydra
from omegaconf import DictConfig

from recsys.dashboard import run
from recsys.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="../../conf", config_name="dashboard")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
