"""qat-demo: the core in one screen. Thin: compose, check, build, call `qat.demo.run`."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from qat.demo import run
from qat.jobs.config import check_keys
from qat.cli.boundary import guard, run_hydra
from qat.recipes import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="demo", version_base="1.3")
@guard("qat-demo")
def _main(cfg: DictConfig) -> None:
    check_keys(OmegaConf.to_container(cfg), "demo")  # a misspelt `+tiny.layerz=4` names the valid keys
    print(run(cfg.quant, **cfg.tiny, tokens=cfg.tokens))


def main(argv: list[str] | None = None) -> None:
    """The `qat-demo` console script: Hydra overrides in `argv` (default: the command line)."""
    run_hydra("qat-demo", _main, argv)


if __name__ == "__main__":
    main()
