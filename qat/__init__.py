"""qat: quantization-aware training, PTQ baselines and real-integer export for LLMs.

    import qat
    model = qat.prepare(model, qat.load_recipe("w4a16_g128"))   # fake-quant modules, STE gradients
    ...train...
    qat.convert(model)                                            # packed integer weights, same outputs
"""
from qat.control import (calibrate, format_table, quantization_disabled, quantizers, set_lean_ste, set_quantizers,
                         summary)
from qat.recipes import recipe_names
from qat.spec import QuantSpec, TensorSchemes
from qat.transform import QuantRecipe, convert, load_recipe, plan, prepare, to_float

__all__ = [
    "QuantSpec",
    "TensorSchemes",
    "QuantRecipe",
    "load_recipe",
    "recipe_names",
    "prepare",
    "plan",
    "convert",
    "to_float",
    "calibrate",
    "quantizers",
    "set_quantizers", "set_lean_ste",
    "quantization_disabled",
    "summary",
    "format_table",
]
__version__ = "0.1.0"
