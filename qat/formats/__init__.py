"""Number formats, one registered `Format` per family: int, fp8, ggml (GGUF legacy blocks), ggml_k (K-quants), ...

Each format owns its QuantSpec checks, qparams, codes <-> values, the storage layout of a converted weight
(hence `bits_per_weight`) and the GGUF types it stores exactly. Every module of this package is imported
here, and registers its format on import: a new format is one new file in this folder.

Example:
    >>> from qat.formats import bits_per_weight, get_format
    >>> get_format("ggml").gguf_type(qat.load_recipe("gguf_q4_1").base.weight)
    'Q4_1'
"""
from __future__ import annotations

import importlib
import pkgutil

from qat.formats.base import (FORMATS, Format, GGUFType, bits_per_weight, fallback_spec, get_format, gguf_fallback,
                              gguf_types, qparam_count, register_format, storage_bits)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["FORMATS", "Format", "GGUFType", "bits_per_weight", "fallback_spec", "get_format", "gguf_fallback",
           "gguf_types", "qparam_count", "register_format", "storage_bits"]
