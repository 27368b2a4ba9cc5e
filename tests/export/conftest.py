"""Shared fixtures: a tiny random Llama (hidden 256 so K-quant super-blocks fit) and token ids."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from qat import testing


def tiny_llama(tie: bool = False, seed: int = 0) -> transformers.LlamaForCausalLM:
    """The export tests' model (qat.testing.tiny_llama): rows of 256, so K-quant super-blocks fit."""
    return testing.tiny_llama(vocab_size=320, hidden_size=256, intermediate_size=512, max_position_embeddings=128,
                              tie_word_embeddings=tie, seed=seed)


@pytest.fixture(scope="session")
def _base():
    return tiny_llama()


@pytest.fixture
def model(_base):
    return copy.deepcopy(_base)


@pytest.fixture(scope="session")
def ids():
    return torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits
