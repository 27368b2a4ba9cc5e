"""compressed-tensors' FP4 layouts: `mxfp4-pack-quantized` (MXFP4), writer and reader.

`qat.export.compressed` routes a linear here when its weight format is one of `FP_FORMATS`; the checkpoint's
config group then carries its own `format` (a checkpoint mixing int and fp4 groups is "mixed-precision").

Per MXFP4 linear `<m>` (compressed-tensors 0.20's MXFP4PackedCompressor):
    <m>.weight_packed   uint8 [out, in / 2]: E2M1 codes (sign << 3 | magnitude index), element 2j in the low
                        nibble of byte j, element 2j + 1 in its high nibble (pack_fp4_to_uint8)
    <m>.weight_scale    uint8 [out, in / 32]: E8M0 exponents, scale = 2^(e - 127)
weights args: {num_bits: 4, type: float, strategy: group, group_size: 32, symmetric: true, scale_dtype: torch.uint8}.
The codes and exponents are the converted weight's own, so compressed-tensors decodes exactly our values.
"""
from __future__ import annotations

import torch

from qat.formats import get_format
from qat.formats.minifloat import e8m0_bytes, e8m0_scale
from qat.formats.mxfp4 import mxfp4_spec
from qat.modules.quantized import QuantizedWeight
from qat.spec import QuantSpec

FP_FORMATS = {"mxfp4": "mxfp4-pack-quantized"}  # qat format name -> compressed-tensors format


def fp_format(spec: QuantSpec) -> str | None:
    """The compressed-tensors format that holds `spec`'s weights in this module's layouts, or None."""
    return FP_FORMATS.get(get_format(spec).name)


def fp_weights_args(spec: QuantSpec) -> dict:
    """compressed-tensors QuantizationArgs (as JSON) of an FP4 weight scheme."""
    return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group", "group_size": spec.group_size,
            "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None,
            "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"}


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols / 2] with element 2j in the low nibble of byte j and 2j + 1 in the high nibble."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: uint8 codes [rows, 2 * cols]."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def fp_linear_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one FP4 linear."""
    scale, _ = qw.qparams()
    return {f"{name}.weight_packed": pack_nibbles(qw.codes().reshape(qw.shape)),
            f"{name}.weight_scale": e8m0_bytes(scale.reshape(qw.shape[0], -1))}


def fp_quantized_weight(t: dict, name: str, w_args: dict, fmt: str) -> QuantizedWeight:
    """The QuantizedWeight of one FP4 linear of a checkpoint in compressed-tensors format `fmt`.

    Raises:
        ValueError: a format or weights args this reader does not know, naming the module.
    """
    if fmt != "mxfp4-pack-quantized" or w_args.get("group_size") != 32 or w_args.get("num_bits") != 4:
        raise ValueError(f"compressed-tensors: {name} has format {fmt!r} with weights {w_args}; qat reads "
                         "mxfp4-pack-quantized (4-bit float, group_size 32)")
    codes = unpack_nibbles(t[f"{name}.weight_packed"])
    scale = e8m0_scale(t[f"{name}.weight_scale"]).reshape(codes.shape[0], -1, 1)
    spec = mxfp4_spec()
    qw = QuantizedWeight(spec, tuple(codes.shape))
    qw.set_codes(codes, scale, None)
    return qw
