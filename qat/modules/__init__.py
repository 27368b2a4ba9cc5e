"""Fake-quant and real-integer modules, and the registries that map float modules onto them."""
from qat.modules.registry import FAKE_QUANT, QUANTIZED, register_fake_quant, register_quantized
from qat.modules.quantizer import TensorQuantizer
from qat.modules.fake import FakeQuantEmbedding, FakeQuantLinear
from qat.modules.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedWeight
from qat.modules.experts import FakeQuantExperts, QuantizedExperts, is_experts
from qat.modules.router import FakeQuantRouter, QuantizedRouter, is_router
from qat.modules.kv_cache import attach_kv_quantizers, is_attention

__all__ = [
    "FAKE_QUANT",
    "QUANTIZED",
    "register_fake_quant",
    "register_quantized",
    "TensorQuantizer",
    "FakeQuantLinear",
    "FakeQuantEmbedding",
    "QuantizedLinear",
    "QuantizedEmbedding",
    "QuantizedWeight",
    "FakeQuantExperts",
    "QuantizedExperts",
    "FakeQuantRouter",
    "QuantizedRouter",
    "is_router",
    "is_experts",
    "attach_kv_quantizers",
    "is_attention",
]
