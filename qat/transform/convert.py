"""`convert`: fake-quant modules -> real-integer modules; `to_float`: back to plain torch modules."""
from __future__ import annotations

from torch import nn

from qat.errors import ConfigError
from qat.modules.registry import FAKE_QUANT, QUANTIZED
from qat.transform.prepare import set_module


def convert(model: nn.Module) -> nn.Module:
    """Replace every fake-quant module by its real-integer counterpart (packed codes), in place.

    The converted forward equals the fake-quant forward exactly (same quantize/dequantize calls).
    KV-cache quantizers stay: they simulate the runtime's cache, which quantizes at run time.

    Example:
        >>> qat.convert(qat.prepare(model, recipe))
    """
    targets = [(n, m) for n, m in model.named_modules() if type(m) in QUANTIZED]
    if not targets and not any(hasattr(m, "k_quantizer") for m in model.modules()):
        if any(type(m) in set(QUANTIZED.values()) for m in model.modules()):
            raise ConfigError("convert: the model is already converted (it holds real-integer modules)")
        raise ConfigError("convert: the model has no fake-quant modules; call qat.prepare first")
    for name, module in targets:
        if getattr(module, "weight_quantizer", None) is None and not getattr(module, "weight_quantizers", None):
            continue  # input-only quantization: nothing to store as integers
        quantized = QUANTIZED[type(module)].from_fake(module)
        if name:
            set_module(model, name, quantized)
        else:
            return quantized
    return model


def to_float(model: nn.Module) -> nn.Module:
    """Replace every fake-quant or real-integer module by a plain torch module, in place.

    Fake-quant modules give back their float weights; real-integer modules their dequantized weights.
    KV-cache quantizers are removed and the model's attention implementation is restored.
    """
    swappable = set(FAKE_QUANT.values()) | set(QUANTIZED) | set(QUANTIZED.values())
    for name, module in list(model.named_modules()):
        if type(module) in swappable and name:
            set_module(model, name, module.to_float())
    base = None
    for module in model.modules():
        base = getattr(module, "qat_base_attention", base)
        for attr in ("k_quantizer", "v_quantizer", "qat_base_attention"):
            if hasattr(module, attr):
                delattr(module, attr)
    if base is not None and hasattr(model, "set_attn_implementation"):
        # give back the attention the model had before prepare: a config saying "qat_kv" cannot be loaded
        # where qat has not registered it
        model.set_attn_implementation(base)
    return model
