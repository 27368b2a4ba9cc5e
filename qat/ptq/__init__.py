"""PTQ baselines in the QAT pipeline: RTN, GPTQ, AWQ, SmoothQuant.

Each method runs on a model after `qat.prepare`: it sets the float weight of every FakeQuantLinear to
its solved values and pins the qparams it solved with (`weight_quantizer.set_qparams`), so the
fake-quant forward reproduces the quantized weight exactly and `qat.convert` stores exactly its codes.

    model = qat.ptq.ptq_model(model, "w4a16_g128", "gptq", batches, actorder=True)
    qat.convert(model)
"""
from qat.ptq.api import METHODS, apply, count_tokens, method_config, ptq_model
from qat.ptq.awq import AWQConfig, search_clip, search_scale
from qat.ptq.gptq import GPTQConfig, gptq_quantize
from qat.ptq.rtn import RTNConfig, pin_rtn
from qat.ptq.smoothquant import SmoothQuantConfig, smooth_scale
from qat.ptq.stats import InputStats, record_inputs

__all__ = [
    "METHODS", "apply", "ptq_model", "method_config", "count_tokens",
    "RTNConfig", "GPTQConfig", "AWQConfig", "SmoothQuantConfig",
    "pin_rtn", "gptq_quantize", "search_scale", "search_clip", "smooth_scale",
    "InputStats", "record_inputs",
]
