"""Shared fixtures: a tiny real Llama from qat.testing (transformers.LlamaConfig, no downloads)."""
from __future__ import annotations

import os

import pytest
import torch

from qat import testing

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the jobs' `device` defaults to auto (a GPU when there is one); the suite's reference results are CPU results, so
# its jobs run on the CPU on any host (qat.jobs.placement); the gpu-marked tests give device=cuda themselves
os.environ.setdefault("QAT_DEVICE", "cpu")


@pytest.fixture
def tiny_llama():
    return testing.tiny_llama(vocab_size=256)


@pytest.fixture
def token_ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="gpu-marked: needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        # the marker, not `"gpu" in item.keywords`: keywords also hold the names of the folders above the test
        # (a checkout in a folder named gpu would skip every test)
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)
