import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers_train
FIXTURE = Path(__file__).resolve().parents[2] / "configs" / "data" / "tiny_corpus.txt"


@pytest.fixture
def corpus() -> str:
    return str(FIXTURE)


@pytest.fixture
def compose_train():
    """compose(overrides, output_dir) -> the config qat-train would run."""
    from helpers_train import compose_train as fn

    return fn


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP threads per
    process make these tests ~10x slower; restored afterwards so other folders are unaffected."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

