"""Packaging beyond pyproject.toml: the top-level configs/ ships inside the wheel as the package `qat.configs`.

configs/ stays at the repository's top level (Hydra's search path in a checkout); a built wheel carries the same
YAML under qat/configs/, where `qat.recipes.config_root()` finds it.
"""
from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["qat", "qat.*"]), "qat.configs"],
    package_dir={"qat.configs": "configs"},
    package_data={"qat.configs": ["**/*.yaml", "data/*.txt", "harness_tasks/*.py"]},  # recipes, config groups, the fixture corpus
)
