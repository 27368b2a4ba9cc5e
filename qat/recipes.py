"""Where qat's configs are (the Hydra config groups, quant recipes in configs/quant/), and reading a recipe's YAML
without Hydra. `qat.load_recipe` (qat/transform/recipe.py) validates what this reads."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from qat.errors import BadFileError


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


def read_recipe(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The YAML mapping of a recipe, by name ("w4a16_g128") or from a YAML file path; Hydra's `defaults` dropped.
    `qat.load_recipe` validates it into a QuantRecipe.

    Raises:
        FileNotFoundError: neither a known name nor an existing file, listing the known names.
        BadFileError: a directory, a file that is not YAML, or whose YAML is not a mapping.
    Example:
        >>> read_recipe("w4a16_g128")["weight"]["group_size"]
        128
    """
    path = Path(name_or_path)
    if path.expanduser().is_dir() and str(name_or_path) not in recipe_names():
        raise BadFileError(path, "is a directory; give a recipe YAML file (or a recipe name: "
                                 f"{', '.join(recipe_names())})")
    if not path.suffix:
        path = CONFIG_DIR / "quant" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"quant recipe {str(name_or_path)!r} not found; known recipes: {recipe_names()}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise BadFileError(path, f"not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(data, dict):
        raise BadFileError(path, f"a recipe is a YAML mapping (name, weight, input, ...), not a {type(data).__name__}")
    return {k: v for k, v in data.items() if not k.startswith("defaults")}
