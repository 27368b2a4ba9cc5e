"""Shared helpers: compose configs/train.yaml with overrides (as qat-train would), tiny Lightning runs."""
from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir

from qat.recipes import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[2]  # the repository
FIXTURE = ROOT / "configs" / "data" / "tiny_corpus.txt"


def compose_train(overrides: list[str], output_dir: Path | str = "/tmp/qat-test-out"):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def subprocess_env() -> dict:
    """Environment for qat-train subprocesses: one OpenMP thread (see conftest.one_thread)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}
