"""compressed-tensors' integer layout, `pack-quantized`, of one linear: writer and reader.

`qat.export.compressed` routes a linear here when its weight scheme is an int one (the float formats go to
`qat.export.compressed_fp`); fused MoE experts are written as such linears, expert by expert
(`qat.export.ct_experts`). The layout of `<m>` is in `qat.export.compressed`'s docstring; GPTQ's packing
(`qat.export.gptq`) shares `pack_int32` / `unpack_int32`.
"""
from __future__ import annotations

import torch

from qat.errors import ConfigError
from qat.export.compressed_fp import FP8_WEIGHTS, FP_FORMATS, TENSORS
from qat.formats import get_format
from qat.modules.quantized import QuantizedWeight
from qat.packing import pack, unpack
from qat.spec import QuantSpec

STRATEGY = {"per_group": "group", "per_channel": "channel", "per_tensor": "tensor"}  # qat granularity -> strategy

# How asymmetric zero-points are stored. "padded" (the default): int32 [out, groups], the packed words in the first
# ceil(out * bits / 32) rows and zeros after. That is the parameter transformers 5 + compressed-tensors 0.20 create
# before loading (transformers compresses the meta model with compressed-tensors' compress_model, whose meta
# branch in compressors/pack_quantized/base.py leaves the zero-point unpacked, [out, groups]), and their
# decompress unpacks only the first rows: such a checkpoint loads there with equal logits. "packed":
# [ceil(out * bits / 32), groups], as compressed-tensors' own compressor writes it (the shape vLLM's wNa16 loader
# allocates); that transformers refuses it (size mismatch). qat's loader reads both.
ZERO_POINT_LAYOUTS = ("padded", "packed")


def pack_int32(codes_unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes [rows, cols] along cols into int32 [rows, ceil(cols*bits/32)] (LSB first).

    Each row is zero-padded to a multiple of 32 codes, so rows start on word boundaries; `qat.packing.pack`
    then packs all rows at once (same bit order), and the words past ceil(cols*bits/32) are dropped.
    """
    rows, cols = codes_unsigned.shape
    words = -(-cols * bits // 32)
    u = torch.nn.functional.pad(codes_unsigned.to(torch.uint8), (0, (-cols) % 32))
    packed = pack(u, bits).view(rows, -1)[:, : words * 4].contiguous()
    return packed.view(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_int32`: uint8 codes [rows, cols]."""
    rows = packed.shape[0]
    padded = cols + (-cols) % 32
    raw = packed.contiguous().view(torch.uint8)
    raw = torch.nn.functional.pad(raw, (0, padded * bits // 8 - raw.shape[1]))
    return unpack(raw.reshape(-1), bits, rows * padded).view(rows, padded)[:, :cols]


def check_int_spec(name: str, spec: QuantSpec) -> None:
    """Refuse a weight scheme that `pack-quantized` cannot hold (also naming what the float layouts take).

    Raises:
        ConfigError: not an int scheme per_tensor / per_channel (axis 0) / per_group on the uniform grid, naming
            `name`.
    """
    if "compressed-tensors" not in get_format(spec).holds or spec.is_float or spec.granularity not in STRATEGY:
        raise ConfigError(f"compressed-tensors: {name} has {spec.describe()}; supported: int weights per_tensor / "
                          f"per_channel / per_group on the uniform grid, {FP8_WEIGHTS} weights, or "
                          f"{' / '.join(FP_FORMATS)} weights (the microscaling / block-scaled float formats)")
    if spec.granularity == "per_channel" and spec.axis != 0:
        raise ConfigError(f"compressed-tensors: {name} is per_channel on axis {spec.axis}; only axis 0 (output) is stored")


def int_weights_args(spec: QuantSpec, actorder: bool) -> dict:
    """The config group's `weights` args of an int weight scheme (`actorder`: a `weight_g_idx` is stored)."""
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "strategy": STRATEGY[spec.granularity],
            "group_size": spec.group_size, "dynamic": False, "actorder": "group" if actorder else None,
            "observer": "minmax", "block_structure": None}


def int_linear_tensors(name: str, qw, zero_points: str = "padded") -> dict[str, torch.Tensor]:
    """The `pack-quantized` tensors of the linear `name` from its QuantizedWeight (or anything with its `spec`,
    `shape`, `codes()`, `qparams()` and `group_index()`: an expert's slice); `zero_points` from `ZERO_POINT_LAYOUTS`."""
    spec, half = qw.spec, 2 ** (qw.spec.bits - 1)
    signed = qw.codes().to(torch.int16) - (0 if spec.signed else half)
    out = {f"{name}.weight_packed": pack_int32((signed + half).to(torch.uint8), spec.bits),
           f"{name}.weight_shape": torch.tensor(qw.shape, dtype=torch.int64)}
    scale, zp = qw.qparams()
    scale = scale.reshape(qw.shape[0], -1) if scale.ndim else scale.reshape(1)
    out[f"{name}.weight_scale"] = scale.to(spec.torch_scale_dtype)
    if zp is not None:
        zs = zp.reshape(qw.shape[0], -1).to(torch.int16) - half + half  # signed zp + offset = unsigned zp
        packed = pack_int32(zs.t().to(torch.uint8), spec.bits).t().contiguous()
        if zero_points == "padded":
            packed = torch.cat([packed, packed.new_zeros(qw.shape[0] - packed.shape[0], packed.shape[1])])
        out[f"{name}.weight_zero_point"] = packed
    if qw.group_index() is not None:
        out[f"{name}.weight_g_idx"] = qw.group_index().to(torch.int32)
    return out


def _spec_from_args(w: dict, scale_dtype: torch.dtype, in_features: int) -> QuantSpec:
    gran = {v: k for k, v in STRATEGY.items()}[w["strategy"]]
    sd = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(scale_dtype, "fp32")
    group = w.get("group_size") if gran == "per_group" else None
    ragged = bool(group and in_features % group)  # ceil(in / g) groups, the last one shorter
    return QuantSpec(bits=w["num_bits"], symmetric=w["symmetric"], granularity=gran, group_size=group,
                     ragged=ragged, scale_dtype=sd)


def _check_args(w: dict, n: str) -> None:
    """The weights args of a config group are ones this reader takes (types checked: JSON edits are refused)."""
    group = w.get("group_size")
    ok = (type(w.get("num_bits")) is int and 2 <= w["num_bits"] <= 8 and w.get("type", "int") == "int"
          and type(w.get("symmetric")) is bool and w.get("strategy") in STRATEGY.values()
          and (w["strategy"] != "group" or (type(group) is int and group > 0)))
    if not ok:
        raise ConfigError(f"{n}: weights scheme {w} is not one this reader takes (int, num_bits 2..8, "
                          "strategy tensor / channel / group with a positive group_size)")


def _expect(t: dict, key: str, dtype: torch.dtype | tuple, shape: tuple) -> None:
    if key not in t:
        raise ConfigError(f"tensor {key} is missing from {TENSORS}")
    v = t[key]
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if v.dtype not in dtypes or tuple(v.shape) != tuple(shape):
        raise ConfigError(f"tensor {key} in {TENSORS} is {v.dtype} {tuple(v.shape)}; the scheme needs {dtypes[0]} "
                          f"{tuple(shape)}")


def int_quantized_weight(t: dict, n: str, w_args: dict, out_f: int, in_f: int) -> QuantizedWeight:
    """The QuantizedWeight of the `pack-quantized` linear `n` [out_f, in_f] from the checkpoint's tensors `t`.

    Raises:
        ConfigError: weights args this reader does not take, a missing tensor or one whose dtype / shape does not
            fit the scheme and the model's layer (named).
    """
    _check_args(w_args, n)
    _expect(t, f"{n}.weight_shape", torch.int64, (2,))
    shape = tuple(int(s) for s in t[f"{n}.weight_shape"])
    if shape != (out_f, in_f):
        raise ConfigError(f"{n}.weight_shape is {shape}; the model's layer is {(out_f, in_f)}")
    bits, strategy, g = w_args["num_bits"], w_args["strategy"], w_args.get("group_size")
    groups = {"group": -(-in_f // (g or 1)), "channel": 1, "tensor": None}[strategy]
    floats = (torch.float32, torch.float16, torch.bfloat16)
    _expect(t, f"{n}.weight_packed", torch.int32, (out_f, -(-in_f * bits // 32)))
    _expect(t, f"{n}.weight_scale", floats, (1,) if groups is None else (out_f, groups))
    packed_rows = -(-out_f * bits // 32)
    if not w_args["symmetric"]:  # either layout of ZERO_POINT_LAYOUTS
        zp_rows = t[f"{n}.weight_zero_point"].shape[0] if f"{n}.weight_zero_point" in t else packed_rows
        _expect(t, f"{n}.weight_zero_point", torch.int32, (out_f if zp_rows == out_f else packed_rows, groups or 1))
    if f"{n}.weight_g_idx" in t:
        _expect(t, f"{n}.weight_g_idx", torch.int32, (in_f,))
    scale = t[f"{n}.weight_scale"]
    spec = _spec_from_args(w_args, scale.dtype, shape[1])
    half = 2 ** (spec.bits - 1)
    u = unpack_int32(t[f"{n}.weight_packed"], spec.bits, shape[1]).to(torch.int16)
    codes = (u - half).to(torch.int8) if spec.signed else u.to(torch.uint8)
    scale = scale.float().reshape({"per_group": (shape[0], -1, 1), "per_channel": (shape[0], 1)}.get(spec.granularity, ()))
    zp = None
    if not spec.symmetric:
        zpu = unpack_int32(t[f"{n}.weight_zero_point"][:packed_rows].t().contiguous(), spec.bits, shape[0]).t()
        zp = zpu.float().reshape(scale.shape)
    qw = QuantizedWeight(spec, shape)
    if f"{n}.weight_g_idx" in t:
        qw.g_idx = t[f"{n}.weight_g_idx"].to(torch.int64)
    qw.set_codes(codes, scale, zp)
    return qw
