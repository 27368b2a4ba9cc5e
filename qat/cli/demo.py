"""qat-demo: the core in one screen. Thin: compose, check, build, call `qat.demo.run`."""
from __future__ import annotations

import inspect

import hydra
from omegaconf import DictConfig

from qat.recipes import CONFIG_DIR


def check_tiny(tiny: dict) -> None:
    """`tiny.*` keys must be tiny_llama's arguments (a misspelt `+tiny.layerz=4` names the valid ones).

    Raises:
        ValueError: unknown keys, with the valid keys.
    Example:
        >>> check_tiny({"layers": 4})
    """
    from qat.demo import tiny_llama

    valid = set(inspect.signature(tiny_llama).parameters)
    unknown = sorted(set(tiny) - valid)
    if unknown:
        raise ValueError(f"tiny: unknown key(s) {unknown}; valid keys are {sorted(valid)}")


@hydra.main(config_path=str(CONFIG_DIR), config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from qat.demo import run

    check_tiny(dict(cfg.tiny))
    print(run(cfg.quant, **cfg.tiny, tokens=cfg.tokens))


if __name__ == "__main__":
    main()
