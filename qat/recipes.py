"""Find and load quant recipes from configs/quant/ (the Hydra config group), without Hydra."""
from __future__ import annotations

from pathlib import Path

import yaml

from qat.transform.recipe import QuantRecipe


def config_root() -> Path:
    """The Hydra config root: the packaged copy in an installed wheel, else the checkout's top-level configs/.

    A wheel carries configs/ as `qat/configs` (setup.py); a checkout or an editable install has no qat/configs
    and reads the repository's configs/ directly, so edits there take effect without reinstalling.
    Raises:
        FileNotFoundError: neither exists (a broken install), naming both places looked at.
    Example:
        >>> (config_root() / "train.yaml").is_file()
        True
    """
    here = Path(__file__).resolve().parent
    for root in (here / "configs", here.parent / "configs"):
        if (root / "quant").is_dir():
            return root
    raise FileNotFoundError(f"qat's configs not found in {here / 'configs'} (a wheel) or {here.parent / 'configs'} "
                            "(a checkout); reinstall qat")


CONFIG_DIR = config_root()


def recipe_names() -> list[str]:
    """Names of the recipes in configs/quant/."""
    return sorted(p.stem for p in (CONFIG_DIR / "quant").glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> QuantRecipe:
    """Load a recipe by name ("w4a16_g128") or from a YAML file path.

    Raises:
        FileNotFoundError: neither a known name nor an existing file, listing the known names.
    Example:
        >>> load_recipe("w4a16_g128").base.weight.group_size
        128
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / "quant" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"quant recipe {str(name_or_path)!r} not found; known recipes: {recipe_names()}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    data = {k: v for k, v in data.items() if not k.startswith("defaults")}
    return QuantRecipe.from_dict(data)
