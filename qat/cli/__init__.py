"""Thin Hydra entry points. Importing this package registers the config resolvers they share."""
from omegaconf import OmegaConf

from qat.recipes import CONFIG_DIR


def register_resolvers() -> None:
    """`${qat_root:}` (configs/paths): the folder above the config root (a checkout: the repository, where
    tests/fixtures lives)."""
    if not OmegaConf.has_resolver("qat_root"):
        OmegaConf.register_new_resolver("qat_root", lambda: str(CONFIG_DIR.parent))


register_resolvers()
