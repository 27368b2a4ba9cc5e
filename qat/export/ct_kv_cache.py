"""compressed-tensors' `kv_cache_scheme`: writer and reader.

A static per-tensor symmetric KV-cache scheme (int, or fp8_e4m3: the one vLLM's KV cache takes) is written as
kv_cache_scheme {strategy: tensor, dynamic: false} with `<attention>.k_scale` / `.v_scale` [1], as
compressed-tensors names them; other KV schemes (per-token dynamic) have no place (`kv_scheme` returns None and the
writer's `warn_unstored` names them). The loader re-attaches KV-cache quantizers pinned to the stored scales.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qat.errors import ConfigError
from qat.modules.kv_cache import attach_kv_quantizers
from qat.spec import QuantSpec

KV_TYPES = {"int": "int", "fp8_e4m3": "float"}  # qat dtype -> compressed-tensors type
KV_TENSORS = (".k_scale", ".v_scale")  # the suffixes of the attention modules' stored scales


def kv_scheme(model: nn.Module) -> tuple[dict | None, dict[str, nn.Module]]:
    """(kv_cache_scheme, attention modules) when the model's KV-cache scheme is one the format holds (one static
    per-tensor symmetric scheme); else (None, {}), and `warn_unstored` says what is dropped.

    Raises:
        ConfigError: a static KV scheme with no calibrated range yet (naming the module).
    """
    attention = {n: m for n, m in model.named_modules() if getattr(m, "k_quantizer", None) is not None}
    specs = {q.spec for m in attention.values() for q in (m.k_quantizer, m.v_quantizer)}
    spec = next(iter(specs)) if len(specs) == 1 else None
    if spec is None or spec.dynamic or spec.granularity != "per_tensor" or not spec.symmetric \
            or spec.learn != "none" or spec.grid != "uniform" or spec.dtype not in KV_TYPES:
        return None, {}
    for n, m in attention.items():
        if not (m.k_quantizer.initialized and m.v_quantizer.initialized):
            raise ConfigError(f"compressed-tensors export: {n} has a static KV-cache scheme ({spec.describe()}) with no "
                              "range yet; calibrate the model (qat.calibrate) first")
    args = {"num_bits": spec.bits, "type": KV_TYPES[spec.dtype], "symmetric": True, "strategy": "tensor",
            "dynamic": False, "group_size": None, "observer": "minmax", "block_structure": None, "actorder": None}
    return args, attention


def kv_tensors(attention: dict[str, nn.Module]):
    """(name, tensor) of each attention module's `k_scale` / `v_scale` [1], in the scheme's scale dtype."""
    for n, m in attention.items():
        for kind, quantizer in (("k", m.k_quantizer), ("v", m.v_quantizer)):
            scale = quantizer.qparams(torch.empty(0))[0]
            yield f"{n}.{kind}_scale", scale.detach().reshape(1).to(quantizer.spec.torch_scale_dtype)


def attach_kv(model: nn.Module, t: dict, kv: dict, folder: Path) -> None:
    """KV-cache quantizers on the attention modules with `k_scale` / `v_scale`, pinned to those scales.

    Raises:
        ConfigError: a kv_cache_scheme qat does not read, or one with no stored scales (naming the folder).
    """
    names = sorted(k.removesuffix(".k_scale") for k in t if k.endswith(".k_scale"))
    if kv.get("dynamic") or kv.get("strategy") != "tensor" or not kv.get("symmetric") or not names \
            or kv.get("type") not in KV_TYPES.values():
        raise ConfigError(f"{str(folder)!r}: kv_cache_scheme {kv} is not one qat reads (static, strategy tensor, "
                          "symmetric, int or float, with <attention>.k_scale / .v_scale tensors)")
    scale_dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(t[f"{names[0]}.k_scale"].dtype, "fp32")
    dtype = "int" if kv["type"] == "int" else "fp8_e4m3"
    spec = QuantSpec(bits=kv["num_bits"], dtype=dtype, symmetric=True, granularity="per_tensor", scale_dtype=scale_dtype)
    attach_kv_quantizers(model, {n: model.get_submodule(n) for n in names}, spec)
    for n in names:
        module = model.get_submodule(n)
        module.k_quantizer.set_qparams(t[f"{n}.k_scale"].float().reshape(()))
        module.v_quantizer.set_qparams(t[f"{n}.v_scale"].float().reshape(()))
