"""Straight-through estimators around the one numerics in `qat.primitives`.

Forward passes call `fake_quantize_forward`, so their values are those of quantize -> dequantize.
Backward passes differ only in the gradients they hand out:

    fake_quantize           dx = g * inside                    (plain STE; keeps one bool mask)
    learned_fake_quantize   dx = g * inside                    (LSQ / LSQ+ / PACT)
                            ds = sum g * (x^ - inside * x) / s * grad_scale   (LSQ, Esser et al. 2020)
                            ds = sum g * (1 - inside) * x^ / s                (PACT: clipped elements only)
                            dz = sum g * (1 - inside) * (-s) * grad_scale     (LSQ+ learned zero-point)

`inside` marks elements whose unclamped code lies in [qmin, qmax]; x^ is the fake-quantized output.

    fake_quant_linear       y = linear(x^, w^, b) with the gradients above for x, w and their qparams, but
                            it keeps only x, w (and the qparams) for backward and recomputes x^, w^ and the
                            masks there: no fake-quantized copy of a weight or an input, no mask, stays alive
                            between forward and backward (the memory-lean STE).
    lean_fake_quantize      x^ with the gradients above for x and its qparams; keeps x and the qparams, not x^
                            or the mask. With `recomputing_saved_views`, tensors that a consumer saves for its
                            backward and that are views of x^ are kept as a recipe and recomputed there too
                            (the lean STE for weights used by kernels qat does not own: fused MoE experts).

Layout: `qat.ste.estimators` holds the unfused estimators (`round_ste`, `fake_quantize`, `learned_fake_quantize`,
their shared gradients `learned_grads`) and `FakeQuantArgs`; `qat.ste.lean` the memory-lean ones
(`fake_quant_linear`, `lean_fake_quantize`, `Requantized`, `recomputing_saved_views`). Import them from `qat.ste`.
"""
from __future__ import annotations

from qat.ste.estimators import (FakeQuantArgs, fake_quantize, learned_fake_quantize, learned_grads, lsq_grad_scale,
                                round_ste)
from qat.ste.lean import Requantized, fake_quant_linear, lean_fake_quantize, recomputing_saved_views

__all__ = ["round_ste", "fake_quantize", "learned_fake_quantize", "learned_grads", "lsq_grad_scale",
           "FakeQuantArgs", "fake_quant_linear",
           "Requantized", "lean_fake_quantize", "recomputing_saved_views"]
