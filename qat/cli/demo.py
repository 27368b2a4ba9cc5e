"""qat-demo: the core in one screen. Thin: compose, build, call `qat.demo.run`."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from qat.recipes import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from qat.demo import run

    print(run(cfg.quant, **cfg.tiny, tokens=cfg.tokens))


if __name__ == "__main__":
    main()
