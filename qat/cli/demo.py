"""qat-demo: the core in one screen. Thin: compose, check, build, call `qat.demo.run`."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from qat.demo import run
from qat.jobs.config import check_keys
from qat.recipes import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    check_keys(OmegaConf.to_container(cfg), "demo")  # a misspelt `+tiny.layerz=4` names the valid keys
    print(run(cfg.quant, **cfg.tiny, tokens=cfg.tokens))


if __name__ == "__main__":
    main()
