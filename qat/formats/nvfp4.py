"""NVFP4 (grid="nvfp4", dtype="fp4_e2m1"): E2M1 elements, an FP8 E4M3 scale per block of 16 along the input
dimension, and one FP32 global scale per tensor.

    s_b = amax_b / 6                                   (the block's largest magnitude lands on E2M1's 6)
    g = 2^floor(log2(448 / max_b s_b))                 (per tensor: the largest block scale fits E4M3)
    stored: e4m3(s_b * g) per block, g per tensor;     x^ = E2M1(x / S_b) * S_b,  S_b = e4m3(s_b * g) / g

g is compressed-tensors' `weight_global_scale` (a divisor, 448 * 6 / amax there), rounded down to a power of two
here so that S_b and every E2M1 * S_b are exact in float32 and bfloat16: compressed-tensors decompresses (in
bfloat16) exactly our values. See `qat.formats.minifloat.e4m3_scale_grid`. Element rounding: round to nearest
even, saturating at 6 (as MXFP4). The global comes from all the blocks `qparams` sees at once: a weight's whole
tensor, or (dynamic activations) each activation tensor as it comes.

Weights read from a checkpoint another tool wrote (llm-compressor: G = 448 * 6 / amax exactly, not a power of two)
keep the stored global: `weight_spec_of` gives them `static_global=True`, the converted weight stores the
checkpoint's E4M3 bytes and G as they are (`pack_under`), and its values are E2M1 * (e4m3 / G) computed in float32
(compressed-tensors' `dequantize` at float32, tested) and rounded once to the model's dtype (in bfloat16: the output
of compressed-tensors' NVFP4 decompressor, which gives bfloat16 only). Re-rounding those scales onto the
power-of-two grid instead moved 90% of a tiny model's weights, by up to 5.9%. As GGUF NVFP4 they keep the same
values, re-encoded: the E4M3 block scales times a power of two 2^k (exact), the E2M1 codes (a stored negative zero
becomes +0), and the multiplier 2^-k / G rounded to float32 (`stored_global`): gguf-py decodes e4m3 * E2M1
exactly, times the multiplier the values are within a float32 rounding of ours (not bit-exact: llama.cpp multiplies
the matmul output by it; the writer says so).

Static-global activations (`QuantSpec.static_global`, recipe nvfp4_w4a4: compressed-tensors' NVFP4 preset, its
`dynamic: local` input_activations): the global is held per module, compressed-tensors' `generate_gparam` of the
calibrated running range exactly (not a power of two), and each tensor's blocks are scaled under it as
compressed-tensors' `calculate_qparams` + `fake_quantize` do:

    G = 448 * 6 / amax_tensor (float32; 1 where inf / NaN)     `static_global_scale`, stored as input_global_scale
        (computed as generate_gparam does, Python's 2688.0 / tensor: torch rounds 1 / amax, then multiplies; a
        true division can differ by an ulp)
    S_b = e4m3(min(amax_b / 6 * G, 448)) / G                   `scales_under_global`; x^ = E2M1(x / S_b) * S_b

Such scales are used as given (not put back on the power-of-two grid): x / (S_b / 2) = 2 (x / S_b) and
(2 q) (S_b / 2) = q S_b in float32, so every value equals compressed-tensors' own (tested against its functions). A
block whose E4M3 scale rounds to 0 codes 0 here; compressed-tensors gives it scale 0.125 / G, under which its
elements (|x| < 2^-10 * 6 / G) also round to 0.

Learned scales (learn="lsq"): the parameter is the effective block scale S_b in float32; the grid uses
`e4m3_scale_grid` of it (E4M3 rounding under the global it implies), the gradient passes straight through.

Storage of a converted weight: the 4-bit E2M1 patterns, one E4M3 byte per block, the fp32 global: 4.5 bits per
weight + 32 bits per tensor. Exports: native, compressed-tensors nvfp4-pack-quantized (`qat.export.compressed_fp`).
GGUF NVFP4 (type 40): super-blocks of 64 weights, 36 bytes: the four UE4M3 block scales e4m3(S_b * g) (sign bit
clear), then four times 8 bytes where byte j of sub-block k holds the E2M1 patterns of weights 16k + j (low
nibble) and 16k + j + 8 (high); gguf-py decodes e4m3 * E2M1, i.e. our values times g, and the per-tensor
multiplier 1 / g (a power of two: exact) is written beside it as the F32 tensor "<name>.scale", which llama.cpp
multiplies into the matmul output (as convert_hf_to_gguf writes ModelOpt's weight_scale_2).
"""
from __future__ import annotations

import math

import torch

from qat.formats.base import Format, GGUFType, register_format
from qat.formats.common import divide, encode_rows
from qat.formats.minifloat import (E2M1_MAX, E4M3_MAX, e2m1_codes_, e2m1_from_index, e2m1_index,
                                   e4m3_scale_grid)
from qat.packing import pack, unpack
from qat.spec import QuantSpec

BLOCK = 16


def nvfp4_spec(**changes) -> QuantSpec:
    """The QuantSpec of NVFP4 weights (`changes`: learn="lsq"; static_global=True for W4A4 activations under a
    calibrated global, dynamic=True for activations whose global too comes from each tensor).

    Example:
        >>> nvfp4_spec().describe()
        'fp4_e2m1 sym g16 nvfp4'
    """
    return QuantSpec(bits=4, dtype="fp4_e2m1", symmetric=True, granularity="per_group", group_size=BLOCK,
                     grid="nvfp4", **changes)


def static_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' NVFP4 global scale (`generate_gparam`) of a calibrated amax: 448 * 6 / amax in float32
    (amax clamped to the smallest normal; 1.0 where the result is inf or NaN), a divisor, shaped as `amax`.

    Example:
        >>> static_global_scale(torch.tensor(2688.0))
        tensor(1.)
    """
    # a Python float over a tensor, as generate_gparam writes it: torch computes (1 / amax) * 2688, two roundings
    g = (E4M3_MAX * E2M1_MAX) / amax.float().clamp(min=torch.finfo(torch.float32).tiny)
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0)


def scales_under_global(block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Effective block scales e4m3(min(s_b * G, 448)) / G of float32 block scales s_b = amax_b / 6 under a held
    global G, in compressed-tensors' order of operations (multiply, clamp, round to E4M3, divide)."""
    return (block_scale * global_scale).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float() / global_scale


def _on_grid(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The effective scales the elements use: as given under a held global, else on the power-of-two grid."""
    return scale if spec.static_global else e4m3_scale_grid(scale)[0]


def split_scales(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 block scales as torch.float8_e4m3fn, float32 global g [1]) of effective scales S_b."""
    on_grid, g = e4m3_scale_grid(scale)
    return (on_grid * g).to(torch.float8_e4m3fn), g.reshape(1)


def stored_scales(stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 block scales float8_e4m3fn, flat; float32 global [1]) as a converted weight's `scale` buffer holds
    them: the bytes a compressed-tensors checkpoint stores as weight_scale / weight_global_scale."""
    return stored[:-4].view(torch.float8_e4m3fn), stored[-4:].clone().view(torch.float32)


def weight_spec_of(blocks: torch.Tensor, global_scale: torch.Tensor) -> QuantSpec:
    """The NVFP4 weight scheme that holds E4M3 block scales `blocks` under a stored global G (a checkpoint's
    weight_scale / weight_global_scale) as they are: `nvfp4_spec()` where qat's power-of-two form (`split_scales`
    of blocks / G) gives back the same bytes, else `static_global=True` (G held, the scales used as given: the
    values are E2M1 * (e4m3 / G) in float32, what compressed-tensors' decompression computes)."""
    g = global_scale.float().reshape(1)
    again, again_g = split_scales(blocks.float() / g)
    same = torch.equal(again_g, g) and torch.equal(again.view(torch.uint8), blocks.view(torch.uint8))
    return nvfp4_spec() if same else nvfp4_spec(static_global=True)


def gguf_tensor_scale(scale: torch.Tensor) -> torch.Tensor:
    """The per-tensor multiplier 1 / g of GGUF NVFP4 blocks made from effective scales S_b (float32 [1])."""
    return 1 / split_scales(scale)[1]


def nvfp4_gguf_blocks(codes: torch.Tensor, scale: torch.Tensor, zero_point=None) -> torch.Tensor:
    """GGUF NVFP4 blocks [rows, cols / 64 * 36] from codes [rows, cols] (doubled E2M1 values) and effective
    scales [rows, cols / 16, 1] of one tensor: relative to `gguf_tensor_scale(scale)`."""
    rows = codes.shape[0]
    e4m3 = split_scales(scale.reshape(rows, -1, 1))[0].view(torch.uint8).reshape(-1, 4)
    c = e2m1_index(codes.reshape(-1, 4, BLOCK))
    qs = (c[..., :8] | (c[..., 8:] << 4)).reshape(-1, 32)
    return torch.cat([e4m3, qs], 1).reshape(rows, -1)


def _encode(w: torch.Tensor, values: bool = True):
    """GGUF NVFP4 blocks and (when `values`) the values they mean (times the multiplier) of a whole float tensor."""
    return encode_rows(FORMAT, nvfp4_spec(), w, BLOCK, nvfp4_gguf_blocks, values)


class NVFP4Format(Format):
    """NVFP4; see the module docstring."""

    name, grid, dtypes = "nvfp4", "nvfp4", ("fp4_e2m1",)
    holds = frozenset({"compressed-tensors"})
    held_global = True
    gguf = (GGUFType("NVFP4", 64, 36, nvfp4_spec, _encode, nvfp4_gguf_blocks, tensor_scale=gguf_tensor_scale),)

    def check(self, spec: QuantSpec) -> None:
        if (spec.bits != 4 or not spec.symmetric or spec.granularity != "per_group" or spec.group_size != BLOCK
                or spec.scale_dtype != "fp32" or spec.learn not in ("none", "lsq") or not spec.signed):
            raise ValueError("QuantSpec.dtype='fp4_e2m1' with grid='nvfp4' (NVFP4) needs bits=4, symmetric=True, "
                             "granularity='per_group', group_size=16, scale_dtype='fp32' (E4M3 block scales under "
                             "an fp32 global), learn 'none' or 'lsq', signed left to its default (True)")

    def default_signed(self, spec: QuantSpec) -> bool:
        return True  # the codes are the doubled E2M1 values -12..12 (int8)

    def gguf_type(self, spec: QuantSpec) -> str | None:
        return "NVFP4"  # a held global (static_global weights): the same values, the multiplier 1 / G rounded once

    def qparams(self, lo, hi, spec):
        return e4m3_scale_grid(divide(torch.maximum(-lo, hi), E2M1_MAX))[0], None

    def static_global(self, lo, hi, spec):
        return static_global_scale(torch.maximum(-lo, hi).clamp(min=0))

    def qparams_under(self, lo, hi, global_scale, spec):
        return scales_under_global(divide(torch.maximum(-lo, hi).clamp(min=0), E2M1_MAX), global_scale), None

    def codes(self, view, scale, zero_point, spec, need_mask=False):
        half = _on_grid(scale, spec) * 0.5  # exact: on the grid S_b >= 2^-136; under a held global a normal float
        # 2 x / S_b is 2 (x / S_b) rounded once (as exact as the doubling); a zero scale codes 0 (x / inf)
        d = view / torch.where(half != 0, half, torch.full_like(half, math.inf))  # where on the scales only
        return e2m1_codes_(d, view, need_mask)

    def values(self, t, scale, zero_point, spec):
        return t.mul_(_on_grid(scale, spec) * 0.5)  # doubled codes times half the scale: exact

    def pack(self, codes, scale, zero_point, spec):
        if spec.static_global:
            raise ValueError(f"NVFP4 weights with a held global ({spec.describe()}) are stored with that global: "
                             "QuantizedWeight.set_codes(codes, scale, None, global_scale=G)")
        return self._stored(codes, *split_scales(scale.detach()))

    def pack_under(self, codes, scale, global_scale, spec):
        # scale = fp32(e / G) times G is e within an ulp of float32, far inside half an E4M3 step: e exactly
        g = global_scale.detach().float().reshape(1).to(scale.device)
        return self._stored(codes, (scale.detach() * g).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn), g)

    def _stored(self, codes, blocks, g):
        stored = torch.cat([blocks.reshape(-1).view(torch.uint8), g.view(torch.uint8)])
        return {"packed": pack(e2m1_index(codes), 4), "scale": stored,
                "zero_point": torch.empty(0, dtype=torch.uint8, device=g.device)}

    def stored_global(self, stored, spec, shape):
        if not spec.static_global:
            return None
        blocks, g = stored_scales(stored["scale"])
        return blocks.float().reshape(*shape[:-1], -1, 1), g

    def unpack(self, stored, spec, shape):
        codes = e2m1_from_index(unpack(stored["packed"], 4, math.prod(shape))).reshape(shape)
        blocks, g = stored_scales(stored["scale"])
        return codes, blocks.float().reshape(*shape[:-1], -1, 1) / g, None

    def storage_bits(self, spec, shape):
        return 4 * math.prod(shape) + 8 * (math.prod(shape) // BLOCK) + 32


FORMAT = register_format(NVFP4Format())
