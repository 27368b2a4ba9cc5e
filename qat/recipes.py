"""Find and load quant recipes from configs/quant/ (the Hydra config group), without Hydra."""
from __future__ import annotations

from pathlib import Path

import yaml

from qat.transform.recipe import QuantRecipe

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


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
