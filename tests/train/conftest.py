from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny_corpus.txt"


@pytest.fixture
def corpus() -> str:
    return str(FIXTURE)
