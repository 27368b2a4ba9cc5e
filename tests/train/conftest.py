import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers_train
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny_corpus.txt"


@pytest.fixture
def corpus() -> str:
    return str(FIXTURE)


@pytest.fixture
def compose_train():
    """compose(overrides, output_dir) -> the config qat-train would run."""
    from helpers_train import compose_train as fn

    return fn
