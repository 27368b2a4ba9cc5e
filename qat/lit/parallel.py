"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for a fake-quantized model, as Lightning's ModelParallelStrategy
applies it in `QATModule.configure_model`.

Every decoder block is one FSDP unit and the root model another, so a block's float weights and its learned
quantizer parameters (LSQ / LSQ+ per-group or per-channel scales) are sharded together along dim 0 and
all-gathered together for the block's forward: the quantizers see whole weights and whole scales, exactly as
in a single process. Scalar parameters (a per-tensor PACT clip or LSQ scale) cannot be sharded (fully_shard
refuses 0-d parameters); they are kept out of FSDP, replicated on every rank, and their gradients are averaged
with one all-reduce after each backward (`average_replicated_grads`), which is what FSDP's reduce-scatter does
for the sharded ones. Held ranges (observer buffers) are replicated buffers, merged as in DDP.

`FSDP2Strategy` is Lightning's ModelParallelStrategy set up for this: all devices data-parallel (no tensor
parallelism), sharded checkpoints (one file per rank; `qat.io.load_distributed_checkpoint` reads one back in a
single process, e.g. for qat-export), and buffers shaped by the data they saw (held ranges, pinned qparams)
given the checkpoint's shapes before a resume loads into them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, StrategyRegistry
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from qat.arch import find_arch
from qat.io import is_distributed_checkpoint


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of `model` (its architecture adapter's, else the children of a `layers` ModuleList)."""
    arch = find_arch(model)
    if arch is not None:
        return arch.blocks(model)[1]
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return list(module)
    raise ValueError(f"{type(model).__name__}: no decoder blocks found to shard (no arch adapter, no '*.layers' "
                     "ModuleList); FSDP needs one unit per block")


def is_sharded(model: nn.Module) -> bool:
    """True when some parameter of `model` is a DTensor (FSDP2 / tensor parallel): its forward is collective."""
    return any(isinstance(p, DTensor) for p in model.parameters())


SHARDING_STRATEGIES = (ModelParallelStrategy, FSDPStrategy, DeepSpeedStrategy)
"""Lightning strategies that shard the model's parameters (or optimizer state) across processes."""


def sharding_strategy(strategy: Any) -> str | None:
    """The name of a `trainer.strategy` value when it shards (FSDP2 / ModelParallelStrategy, FSDP, DeepSpeed),
    else None. `strategy`: a registered name ("fsdp", "deepspeed_stage_3", "ddp"...), a class or an instance.

    Example:
        >>> sharding_strategy("fsdp"), sharding_strategy(FSDP2Strategy), sharding_strategy("ddp")
        ('fsdp', 'FSDP2Strategy', None)
    """
    if isinstance(strategy, str):  # Lightning lower-cases a strategy name before it looks it up ("FSDP" is fsdp)
        name = strategy.lower()
        cls = StrategyRegistry[name]["strategy"] if name in StrategyRegistry else None
    else:
        cls = strategy if isinstance(strategy, type) else type(strategy)
    if not (isinstance(cls, type) and issubclass(cls, SHARDING_STRATEGIES)):
        return None
    return strategy if isinstance(strategy, str) else cls.__name__


def shard_fsdp2(model: nn.Module, mesh) -> list[nn.Parameter]:
    """Apply FSDP2 to each decoder block and to the root of `model` over the 1-D data-parallel `mesh`.

    Returns:
        the parameters left replicated (0-d), whose gradients the caller averages after each backward.
    Example:
        >>> replicated = shard_fsdp2(module.model, module.device_mesh["data_parallel"])
    """
    replicated = [p for p in model.parameters() if p.ndim == 0]
    ignored = set(replicated)
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return replicated


@torch.no_grad()
def average_replicated_grads(params: list[nn.Parameter]) -> None:
    """All-reduce (mean over ranks) the gradients of parameters FSDP does not manage; one collective.

    A parameter without a gradient on this rank contributes zeros, so every rank takes part; one that has no
    gradient on any rank keeps none (the optimizer skips it, as it would in one process).
    """
    dist = torch.distributed
    if not params or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.stack([torch.stack([p.grad.reshape(()).float(), p.new_ones((), dtype=torch.float32)])
                        if p.grad is not None else p.new_zeros(2, dtype=torch.float32) for p in params])
    dist.all_reduce(flat)  # gloo has no AVG
    for p, (total, count) in zip(params, flat):
        if count > 0:
            p.grad = (total / dist.get_world_size()).to(p.dtype).reshape(p.shape)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every device (data_parallel_size = world size, tensor_parallel_size = 1) for QATModule.

    Args:
        save_distributed_checkpoint: one shard file per rank (default); False gathers a full checkpoint on rank 0.
        process_group_backend: None chooses gloo on CPU, nccl on CUDA.
    Example:
        >>> pl.Trainer(accelerator="cpu", devices=2, strategy=FSDP2Strategy())
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None):
        path = Path(self.broadcast(checkpoint_path))
        if is_distributed_checkpoint(path):
            shape_buffers_like(self.lightning_module, path)
        return super().load_checkpoint(path, weights_only=weights_only)


def shape_buffers_like(module: nn.Module, folder: Path, prefix: str = "state_dict.") -> int:
    """Give every buffer of `module` that differs in shape from the sharded checkpoint in `folder` that shape.

    DCP loads in place into tensors of the saved shape; held ranges and pinned qparams of a fresh model are
    still empty (their shape comes from data), and would be refused. Returns how many were reshaped.
    """
    saved = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    n = 0
    for name, buf in list(module.named_buffers()):
        meta = saved.get(prefix + name)
        if isinstance(meta, TensorStorageMetadata) and tuple(meta.size) != tuple(buf.shape):
            owner, _, leaf = name.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            setattr(target, leaf, torch.empty(meta.size, dtype=meta.properties.dtype, device=buf.device))
            n += 1
    return n
