"""Shared fixtures: a tiny random Llama (hidden 256 so K-quant super-blocks fit) and token ids."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers


def tiny_llama(tie: bool = False, seed: int = 0) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


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
