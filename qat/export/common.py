"""What the exporters and loaders share about a model: which modules are stored as integers, the weight each
parameter name stands for, and the quantization a format cannot hold.

Exports stream: the writers (native, compressed-tensors, GPTQ; GGUF likewise) quantize one module at a time from
the prepared (fake-quant or PTQ-pinned) model through `weight_of` / `as_converted`, so peak memory is the model
plus about one tensor's temporaries, never a converted copy (tests/export/test_streaming.py). The file plumbing
(atomic writes, safetensors, safe checkpoint loading) is `qat.io`.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch
from torch import nn

from qat.modules.experts import FakeQuantExperts, QuantizedExperts, quantize_expert_weight
from qat.modules.router import QuantizedRouter
from qat.modules.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedWeight
from qat.modules.quantizer import TensorQuantizer
from qat.modules.registry import QUANTIZED
from qat.modules.rotation import online_rotations
from qat.transform import convert

log = logging.getLogger(__name__)
SINGLE = (QuantizedLinear, QuantizedEmbedding, QuantizedRouter)  # converted modules holding one `qweight`


def warn_unstored(model: nn.Module, fmt: str, stores_input: bool, stores_kv: bool = False,
                  stored_rotations: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Warn, once per scheme, about the quantization a format cannot store: activation (input) schemes
    when `stores_input` is False, and KV-cache schemes when `stores_kv` is False. The runtime then computes
    those tensors as it chooses, not as the model was trained or calibrated. Online rotations are warned about
    too, except those of the modules in `stored_rotations` ({"input" / "kv": names} the format does hold).

    Returns:
        {"input <scheme>" / "KV cache <scheme>": [module names]} of what is not stored.
    Example:
        >>> warn_unstored(qat.prepare(model, qat.load_recipe("w4a8_kv8")), "GPTQ", stores_input=False)
    """
    dropped: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        quantizer = getattr(module, "input_quantizer", None) if not stores_input else None
        if quantizer is not None:
            dropped.setdefault(f"input {quantizer.spec.describe()}", []).append(name)
        if not stores_kv and getattr(module, "k_quantizer", None) is not None:
            dropped.setdefault(f"KV cache {module.k_quantizer.spec.describe()}", []).append(name)
    for what, names in dropped.items():
        log.warning("%s export: the %s quantization of %d module(s) (%s) has no place in this format and is "
                    "not stored; runtimes will compute those tensors their own way", fmt, what, len(names),
                    ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""))
    _warn_online_rotations(model, fmt, stored_rotations or {})
    return dropped


def _warn_online_rotations(model: nn.Module, fmt: str, stored: dict[str, list[str]]) -> None:
    """Online rotations have no place in the GPTQ / GGUF formats (compressed-tensors holds power-of-two Hadamards
    only: `qat.export.ct_transforms`): an input rotation (R4) is part of the function (its weight was rotated
    offline), so the file computes something else without it; a key rotation only changes what the cache stores
    (llama.cpp applies its own to a quantized cache)."""
    online = online_rotations(model)
    names = sorted(n for n in online["input"] if n not in set(stored.get("input", ())))
    if names:
        sizes = sorted({f"{online['input'][n]['size']} (blocks of {online['input'][n]['block']})" for n in names})
        why = (" (its transform config defines Hadamards of power-of-two sizes only)"
               if fmt == "compressed-tensors" else "")
        log.warning("%s export: the online input rotation (R4 Hadamard) of %d module(s) (%s), of size %s, has no "
                    "place in this format%s and is not stored; their weights were rotated for it, so a runtime "
                    "without it computes a different model (export format=native keeps it)", fmt, len(names),
                    ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""), ", ".join(sizes), why)
    kv = sorted(n for n, e in online["kv"].items() if not (fmt == "GGUF" and e["source"] == "llama_cpp")
                and n not in set(stored.get("kv", ())))
    if kv:
        log.warning("%s export: the online key/value rotation of %d attention module(s) (%s) is not stored; the "
                    "float function is unchanged, the runtime's cache stores unrotated keys", fmt, len(kv),
                    ", ".join(kv[:3]) + (", ..." if len(kv) > 3 else ""))


def converted_copy(model: nn.Module) -> nn.Module:
    """`model` with real-integer modules: a converted copy of a prepared model, or the model itself.

    The writers do not use it (they convert one module at a time: see `integer_modules`)."""
    if any(type(m) in QUANTIZED for m in model.modules()):
        return convert(copy.deepcopy(model))
    return model


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> QuantizedLinear / QuantizedEmbedding of a converted model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SINGLE)}


def integer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of every module an export stores as integers: converted ones, and fake-quant ones
    with a weight quantizer (`convert` would swap those; `as_converted` does it for one module)."""
    out = {}
    for name, module in model.named_modules():
        converted = isinstance(module, (*SINGLE, QuantizedExperts))
        quantizes = getattr(module, "weight_quantizer", None) is not None or bool(getattr(module, "weight_quantizers", None))
        if converted or (type(module) in QUANTIZED and quantizes):
            out[name] = module
    return out


def integer_kind(module: nn.Module) -> type:
    """QuantizedLinear or QuantizedEmbedding: the class `module` is, or converts to."""
    return type(module) if isinstance(module, (*SINGLE, QuantizedExperts)) else QUANTIZED[type(module)]


def owning_module(key: str, modules: dict[str, nn.Module]) -> str | None:
    """The name in `modules` that state-dict `key` lies under (`a.b.weight_quantizer.lo` -> `a.b`), or None."""
    module = key.rpartition(".")[0]
    while module and module not in modules:
        module = module.rpartition(".")[0]
    return module if module in modules else None


def as_converted(module: nn.Module) -> nn.Module:
    """`module` itself when converted; else a new QuantizedLinear / QuantizedEmbedding made from it as
    `convert` would (sharing its bias and input quantizer), for one module at a time."""
    if isinstance(module, (*SINGLE, QuantizedExperts)):
        return module
    with torch.no_grad():
        return QUANTIZED[type(module)].from_fake(module)


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(module, attribute name) that parameter `name` lives on: `a.b.weight` -> (model.a.b, "weight")."""
    module_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), leaf


def weight_spec(model: nn.Module, name: str):
    """(QuantSpec or None, has an act-order g_idx) of parameter `name`, without quantizing anything."""
    module, leaf = owner_of(model, name)
    if isinstance(module, QuantizedExperts) and leaf in module.qweights:
        return module.qweights[leaf].spec, False
    if isinstance(module, FakeQuantExperts) and leaf in module.weight_quantizers:
        return module.weight_quantizers[leaf].spec, False
    if leaf != "weight":
        return None, False
    if isinstance(module, SINGLE):
        return module.qweight.spec, module.qweight.group_index() is not None
    quantizer = getattr(module, "weight_quantizer", None) if type(module) in QUANTIZED else None
    if quantizer is None:
        return None, False
    return quantizer.spec, quantizer.group_index() is not None


def weight_of(model: nn.Module, name: str) -> torch.Tensor | QuantizedWeight:
    """The float parameter `name`, or the QuantizedWeight standing for `<module>.weight`: the one a
    converted module holds, or (fake-quant module) one made now with its qparams, as `convert` would,
    so that a prepared model exports tensor by tensor without a converted copy in memory."""
    module, leaf = owner_of(model, name)
    if leaf == "weight" and isinstance(module, SINGLE):
        return module.qweight
    if isinstance(module, QuantizedExperts) and leaf in module.qweights:
        return module.qweights[leaf]  # the 2-D view of the expert weight (`qat.modules.experts.to_rows`)
    if isinstance(module, FakeQuantExperts) and leaf in module.weight_quantizers:
        with torch.no_grad():
            return quantize_expert_weight(module, leaf)
    quantizer = getattr(module, "weight_quantizer", None) if type(module) in QUANTIZED else None
    if leaf == "weight" and quantizer is not None:
        with torch.no_grad():
            weight = module.weight.detach()
            quantizer.observe(weight)
            scale, zero_point = quantizer.qparams(weight)
            zero_point = None if zero_point is None else zero_point.detach()
            return QuantizedWeight.from_tensor(weight, quantizer.spec, scale.detach(), zero_point, name,
                                               quantizer.group_index())
    return getattr(module, leaf)


def quantizer_prefixes(model: nn.Module) -> tuple[str, ...]:
    """`"<name>."` of every TensorQuantizer in `model`: what lies under one (learned scales and zero-points,
    PACT clips, held ranges, KV-cache state) is quantization state, never a model tensor.

    Example:
        >>> "model.layers.0.self_attn.q_proj.weight_quantizer." in quantizer_prefixes(prepared)
        True
    """
    return tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, TensorQuantizer))


def float_weight_names(model: nn.Module) -> list[str]:
    """Names of the model's weights as a float model would call them (`x.qweight.*` -> `x.weight`); the
    parameters of quantizers (learned scales, zero-points, clips) are not weights and are left out."""
    names = []
    seen = set()
    quantizers = quantizer_prefixes(model)
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in seen or name.startswith(quantizers):
            continue
        seen.add(name)
        names.append(name)
    for name in quantized_modules(model):
        names.append(f"{name}.weight")
    for name, module in model.named_modules():
        if isinstance(module, QuantizedExperts):
            names += [f"{name}.{leaf}" for leaf in module.qweights]
    return names


def stored_shape(model: nn.Module, name: str) -> tuple[int, ...]:
    """The shape of weight `name` as the float model holds it (3-D for fused expert weights), converted or not."""
    module, leaf = owner_of(model, name)
    if isinstance(module, (QuantizedExperts, FakeQuantExperts)) and leaf in module.shapes:
        return tuple(module.shapes[leaf])
    if leaf == "weight" and hasattr(module, "qweight"):
        return tuple(module.qweight.shape)
    return tuple(getattr(module, leaf).shape)


def load_rest_and_tie(model, rest: dict, folder, config):
    """Load the non-quantized tensors of an exported folder into `model` (its quantized linears already
    swapped in), refusing missing or unexpected tensors; re-tie embeddings when the config says so.

    Raises:
        ValueError: naming the folder and the tensors that do not match the config.
    """
    missing, unexpected = model.load_state_dict(rest, strict=False)
    quantizers = quantizer_prefixes(model)  # KV-cache quantizers hold what the format stored, set before
    missing = [k for k in missing if ".qweight." not in k and ".qweights." not in k and k != "lm_head.weight"
               and not k.startswith(quantizers)]
    if missing or unexpected:
        raise ValueError(f"{str(folder)!r}: tensors do not match the config: missing {missing}, unexpected {unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


WIDE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def stored_float_dtype(tensors: dict[str, torch.Tensor], quantized: Iterable[str] = ()) -> torch.dtype:
    """The dtype most stored 16 / 32 / 64-bit float elements outside the `quantized` modules have: the model's
    dtype when it was exported (embeddings, norms, an unquantized head), which a loader builds the model in;
    float32 when there are none. fp8 weights and the quantized modules' scales do not count."""
    prefixes = tuple(f"{n}." for n in quantized)
    counts: dict[torch.dtype, int] = {}
    for key, t in tensors.items():
        if t.dtype in WIDE_FLOATS and not key.startswith(prefixes):
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32
