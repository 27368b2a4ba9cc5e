"""Fixtures for the PTQ tests: single layers with correlated / outlier inputs, and a tiny Llama."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qat import testing


def correlated_inputs(n: int, dim: int, seed: int = 0, outliers: int = 0, heavy: bool = True) -> torch.Tensor:
    """Heavy-tailed, correlated inputs: Student-t factors mixed, with per-channel scales spanning 30x."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=g)
    if heavy:
        z = z / torch.rand(n, 1, generator=g).clamp(min=0.05).sqrt()  # heavy tails per token
    mix = torch.eye(dim) + 0.5 * torch.randn(dim, dim, generator=g) / dim ** 0.5
    x = z @ mix
    x = x * torch.logspace(0, 1.5, dim)[torch.randperm(dim, generator=g)]
    if outliers:
        x[:, torch.randperm(dim, generator=g)[:outliers]] *= 30.0
    return x


class ScaleNorm(nn.Module):
    """An RMSNorm-like producer: x * weight."""

    def __init__(self, dim: int, plus_one: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.plus_one = plus_one

    def forward(self, x):
        return x * (1 + self.weight if self.plus_one else self.weight)


class Block(nn.Module):
    def __init__(self, dim: int, out: int, plus_one: bool = False) -> None:
        super().__init__()
        self.norm = ScaleNorm(dim, plus_one)
        self.fc = nn.Linear(dim, out, bias=False)
        nn.init.normal_(self.fc.weight, std=dim ** -0.5)  # Gaussian, like trained LLM weights (not uniform)

    def forward(self, x):
        return self.fc(self.norm(x))


class Stack(nn.Module):
    """Decoder-like stack of blocks (a ModuleList the runner finds)."""

    def __init__(self, dim: int = 128, out: int = 128, n: int = 1, plus_one: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(Block(dim, out if i == n - 1 else dim, plus_one) for i in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


MAPPING = [{"prev": "norm", "linears": ["fc"]}]


def recipe(bits=4, group_size=32, symmetric=True, granularity="per_group", inp=None, observer="minmax", ragged=False):
    weight = {"bits": bits, "symmetric": symmetric, "granularity": granularity, "observer": observer}
    if granularity == "per_group":
        weight["group_size"] = group_size
        weight["ragged"] = ragged
    return {"name": "test", "targets": ["Linear"], "ignore": ["lm_head"], "weight": weight, "input": inp}


@pytest.fixture
def tiny_llama():
    return testing.tiny_llama(vocab_size=128, hidden_size=64, intermediate_size=128, max_position_embeddings=64)


@pytest.fixture
def llama_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (2, 32), generator=g) for _ in range(4)]


def compose_job(name, overrides=()):
    """A Hydra config of `configs/<name>.yaml` as the app's job sees it (hydra runtime set), as plain dicts."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from qat.jobs.config import register_resolvers
    from qat.recipes import CONFIG_DIR

    register_resolvers()  # configs/paths' ${qat_root:}, as the CLIs register it (else this file fails run alone)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = "unused"
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return OmegaConf.to_container(cfg, resolve=True)


def gptq_problem(dim=512, out=32, n=2048):
    """(inputs, weight, Gram matrix) of one seeded GPTQ test problem with correlated input columns."""
    x = correlated_inputs(n, dim, seed=4)
    w = torch.randn(out, dim, generator=torch.Generator().manual_seed(5)) / dim ** 0.5
    return x, w, x.t() @ x


def output_error(w, q, gram):
    """The layer-output error of quantized `q` against `w`: trace((q - w) G (q - w)^T)."""
    d = q - w
    return float(((d @ gram) * d).sum())
