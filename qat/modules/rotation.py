"""Online rotations: the Hadamard products a model computes at run time (QuaRot / SpinQuant's R3 and R4, and
llama.cpp's K / V cache rotation).

- `OnlineHadamard` on a Linear's input (R4 on down_proj): a forward pre-hook rotates the input before the
  module's input quantizer sees it; the weight was rotated offline to match (`qat.transform.rotations`).
  `set_module` carries it over when prepare / convert / to_float swap the module.
- `KVRotation` on an attention module: keys and queries after RoPE are multiplied by a block-diagonal Hadamard
  (R3, or llama.cpp's `attn_rot_k`), values before the cache (llama.cpp's `attn_rot_v`) and the attention output
  back; `qat.modules.kv_cache.qat_kv_attention` applies it around the KV quantizers. In float both cancel.

Online rotations hold no tensors: they are rebuilt from their sizes (`online_rotations` / `attach_online`), which
is what the native export records.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qat.modules.hadamard import block_hadamard_apply

INPUT_ROTATION = "input_rotation"
KV_ROTATION = "qat_kv_rotation"


class OnlineHadamard(nn.Module):
    """x -> x @ blockdiag(H_block, ...) over the last dimension (block = size: one Hadamard of the whole row)."""

    def __init__(self, size: int, block: int | None = None):
        super().__init__()
        self.size, self.block = int(size), int(block or size)
        if self.size % self.block:
            raise ValueError(f"OnlineHadamard: block {self.block} does not divide size {self.size}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_hadamard_apply(x, self.block)

    def extra_repr(self) -> str:
        return f"size={self.size}, block={self.block}"


def rotate_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the module's first input times its `input_rotation` (a top-level function: picklable)."""
    return (getattr(module, INPUT_ROTATION)(args[0]), *args[1:])


def attach_input_rotation(module: nn.Module, size: int, block: int | None = None) -> None:
    """Rotate `module`'s input online by a Hadamard of `size` (blocks of `block`) before its forward runs."""
    if hasattr(module, INPUT_ROTATION):
        raise ValueError(f"{type(module).__name__} already has an online input rotation")
    setattr(module, INPUT_ROTATION, OnlineHadamard(size, block))
    module.register_forward_pre_hook(rotate_input)


class KVRotation(nn.Module):
    """Block-diagonal Hadamard rotations of queries and keys (`k_block`) and of values (`v_block`, then the
    attention output back), as llama.cpp's `llama_mul_mat_hadamard` applies them; 0 turns one off.

    `source` says who asked for it ("r3" or "llama_cpp"), for the export record.
    """

    def __init__(self, k_block: int = 0, v_block: int = 0, source: str = "llama_cpp"):
        super().__init__()
        self.k_block, self.v_block, self.source = int(k_block), int(v_block), source
        if self.v_block and self.v_block & (self.v_block - 1):
            # the output is rotated back by the same matrix, which is its own inverse only for Sylvester's
            raise ValueError(f"KVRotation: v_block={v_block} must be a power of two")

    def rotate(self, query, key, value):
        """(q, k, v) as they enter the cache: q and k times H_k, v times H_v ([..., head_dim] each)."""
        if self.k_block:
            query, key = block_hadamard_apply(query, self.k_block), block_hadamard_apply(key, self.k_block)
        if self.v_block:
            value = block_hadamard_apply(value, self.v_block)
        return query, key, value

    def unrotate_output(self, out: torch.Tensor) -> torch.Tensor:
        """The attention output ([..., head_dim]) rotated back (H_v is symmetric and orthogonal: H_v^-1 = H_v)."""
        return block_hadamard_apply(out, self.v_block) if self.v_block else out

    def extra_repr(self) -> str:
        return f"k_block={self.k_block}, v_block={self.v_block}, source={self.source}"


def llama_cpp_kv_blocks(head_dim_k: int, head_dim_v: int) -> tuple[int, int]:
    """llama.cpp's rotation sizes (src/llama-kv-cache.cpp, `build_input_k_rot` / `build_input_v_rot`): K uses the
    largest power of two >= 64 dividing the head size, V always 64; each only when its head size is a multiple
    of 64 (0: not rotated). The cache type must be quantized too, which a KV scheme is."""
    k = 0
    if head_dim_k % 64 == 0:
        k = 64
        while head_dim_k % (k * 2) == 0:
            k *= 2
    return k, (64 if head_dim_v % 64 == 0 else 0)


def online_rotations(model: nn.Module) -> dict[str, Any]:
    """{"input": {module: {size, block}}, "kv": {attention module: {k_block, v_block, source}}}: the online
    rotations of `model`, as the native export records them (empty dicts when none)."""
    out: dict[str, Any] = {"input": {}, "kv": {}}
    for name, module in model.named_modules():
        rot = getattr(module, INPUT_ROTATION, None)
        if isinstance(rot, OnlineHadamard):
            out["input"][name] = {"size": rot.size, "block": rot.block}
        kv = getattr(module, KV_ROTATION, None)
        if isinstance(kv, KVRotation):
            out["kv"][name] = {"k_block": kv.k_block, "v_block": kv.v_block, "source": kv.source}
    return out


def attach_online(model: nn.Module, record: dict[str, Any]) -> None:
    """Re-attach the online rotations `online_rotations` recorded (a reloaded model computes the same)."""
    for name, entry in (record.get("input") or {}).items():
        attach_input_rotation(model.get_submodule(name), int(entry["size"]), int(entry["block"]))
    for name, entry in (record.get("kv") or {}).items():
        setattr(model.get_submodule(name), KV_ROTATION,
                KVRotation(int(entry["k_block"]), int(entry["v_block"]), str(entry.get("source", "llama_cpp"))))


def carry_rotation(old: nn.Module, new: nn.Module) -> None:
    """Give `new` (a swapped-in module) the online input rotation `old` had."""
    rot = getattr(old, INPUT_ROTATION, None)
    if isinstance(rot, OnlineHadamard) and not hasattr(new, INPUT_ROTATION):
        attach_input_rotation(new, rot.size, rot.block)

