"""PTQ baselines in the QAT pipeline: RTN, GPTQ, AWQ, SmoothQuant (one registered class each, `qat.ptq.methods`).

Each method runs on a model after `qat.prepare`: it sets the float weight of every FakeQuantLinear to
its solved values and pins the qparams it solved with (`weight_quantizer.set_qparams`), so the
fake-quant forward reproduces the quantized weight exactly and `qat.convert` stores exactly its codes.

    model = qat.ptq.ptq_model(model, "w4a16_g128", "gptq", batches, actorder=True)
    qat.convert(model)
"""
from qat.ptq.api import apply, method_config, preflight, ptq_model
from qat.ptq.awq import search_clip, search_scale
from qat.ptq.checks import count_tokens
from qat.ptq.gptq import gptq_quantize
from qat.ptq.methods import METHODS, PTQMethod, distributed_methods, get_method, method_of_config, register_method
from qat.ptq.methods.awq import AWQConfig
from qat.ptq.methods.gptq import GPTQConfig
from qat.ptq.methods.rtn import RTNConfig
from qat.ptq.methods.smoothquant import SmoothQuantConfig
from qat.ptq.rtn import pin_rtn
from qat.ptq.runner import BlockContext
from qat.ptq.smoothquant import smooth_scale
from qat.ptq.stats import InputStats, record_inputs

__all__ = [
    "METHODS", "PTQMethod", "register_method", "get_method", "BlockContext",
    "apply", "ptq_model", "preflight", "method_config", "method_of_config", "distributed_methods", "count_tokens",
    "RTNConfig", "GPTQConfig", "AWQConfig", "SmoothQuantConfig",
    "pin_rtn", "gptq_quantize", "search_scale", "search_clip", "smooth_scale",
    "InputStats", "record_inputs",
]
