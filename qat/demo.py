"""The core end to end on a tiny Llama: prepare from a recipe, convert to packed integers, check parity."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from qat.errors import ConfigError
import qat
from qat.testing import tiny_llama


def run(recipe: Mapping[str, Any], tokens: int = 64, **tiny: Any) -> str:
    """Prepare, report, convert, check parity; returns the printed report.

    Args:
        tiny: `qat.testing.tiny_llama` arguments (configs/demo.yaml's `tiny` node).
    Raises:
        ConfigError: a bad tiny size or `tokens` (not 1..max_position_embeddings).
        AssertionError: the converted model does not reproduce the fake-quant logits exactly.
    """
    model = tiny_llama(**tiny)
    context = model.config.max_position_embeddings
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= context:
        raise ConfigError(f"tokens={tokens!r}; must be an integer from 1 to tiny.max_position_embeddings={context}")
    recipe = qat.QuantRecipe.from_dict(recipe)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    qat.prepare(model, recipe)
    qat.calibrate(model, [ids])
    rows = qat.summary(model)
    with torch.no_grad():
        fake = model(ids).logits
    qat.convert(model)
    with torch.no_grad():
        real = model(ids).logits
    exact = torch.equal(real, fake)
    for row, converted in zip(rows, qat.summary(model)):
        row["bits_per_weight"] = converted["bits_per_weight"]  # measured on the packed buffers
    n_params = sum(math.prod(m.qweight.shape) for m in model.modules() if hasattr(m, "qweight"))
    bits = sum(r["bits_per_weight"] * math.prod(m.qweight.shape)
               for r, m in zip(rows, (m for m in model.modules() if hasattr(m, "qweight"))))
    lines = [
        f"recipe {recipe.name}: {recipe.description or recipe.base.describe()}",
        qat.format_table(rows, ["module", "scheme", "sqnr_db", "bits_per_weight"]),
        f"quantized weights: {n_params:,} at {bits / max(n_params, 1):.3f} bits/weight on average",
        f"logit SQNR vs float model: {qat.primitives.quant_error_db(reference, fake):.2f} dB",
        f"converted == fake-quant (atol=0): {exact}",
    ]
    assert exact, "converted model differs from the fake-quant model"
    return "\n".join(lines)
