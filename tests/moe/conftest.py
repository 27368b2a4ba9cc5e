"""Tiny MoE models from the real transformers config classes (qat.testing.tiny_moe)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def moe_ids():
    return torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
