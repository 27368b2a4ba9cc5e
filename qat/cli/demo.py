"""qat-demo: the core in one screen. Thin: compose, check, build, call `qat.demo.run`."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from qat.recipes import CONFIG_DIR
from qat.testing import TINY_KEYS


def check_tiny(tiny: dict) -> None:
    """`tiny.*` keys must be qat.testing.tiny_llama's arguments (a misspelt `+tiny.layerz=4` names the valid ones).

    Raises:
        ValueError: unknown keys, with the valid keys.
    Example:
        >>> check_tiny({"num_layers": 4})
    """
    unknown = sorted(set(tiny) - TINY_KEYS)
    if unknown:
        raise ValueError(f"tiny: unknown key(s) {unknown}; valid keys are {sorted(TINY_KEYS)}")


@hydra.main(config_path=str(CONFIG_DIR), config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from qat.demo import run

    check_tiny(dict(cfg.tiny))
    print(run(cfg.quant, **cfg.tiny, tokens=cfg.tokens))


if __name__ == "__main__":
    main()
