"""compressed-tensors' microscaling layouts: `mxfp4-pack-quantized` (MXFP4), `nvfp4-pack-quantized` (NVFP4),
`mxfp8-quantized` (MXFP8), `float-quantized` with strategy block (FP8 block scaling), writer and reader.

`qat.export.compressed` routes a linear here when its weight format is one of `FP_FORMATS`; the checkpoint's
config group then carries its own `format` (a checkpoint mixing int and fp4 groups is "mixed-precision").

Per MXFP4 linear `<m>` (compressed-tensors 0.20's MXFP4PackedCompressor):
    <m>.weight_packed   uint8 [out, in / 2]: E2M1 codes (sign << 3 | magnitude index), element 2j in the low
                        nibble of byte j, element 2j + 1 in its high nibble (pack_fp4_to_uint8)
    <m>.weight_scale    uint8 [out, in / 32]: E8M0 exponents, scale = 2^(e - 127)
weights args: {num_bits: 4, type: float, strategy: group, group_size: 32, symmetric: true, scale_dtype: torch.uint8}.
Per NVFP4 linear (NVFP4PackedCompressor): the same weight_packed; weight_scale float8_e4m3fn [out, in / 16];
weight_global_scale float32 [1], the divisor g (scale = weight_scale / g); weights args strategy tensor_group,
group_size 16, scale_dtype torch.float8_e4m3fn.
Per FP8-block linear (FloatQuantizationCompressor, strategy block): <m>.weight float8_e4m3fn [out, in],
<m>.weight_scale float32 [ceil(out / b), in / b]; weights args block_structure [b, b].
Per FP8 linear with per-channel (axis 0) or per-tensor e4m3 weights (FloatQuantizationCompressor, strategy channel /
tensor: compressed-tensors' FP8_DYNAMIC / FP8 presets): <m>.weight float8_e4m3fn [out, in], <m>.weight_scale [out, 1]
(channel) or [1] (tensor) in the scheme's scale dtype (fp32 by default); x^ = weight * scale. fp8_dynamic's per-token
activations are its group's input scheme (`qat.export.ct_activations`).
Per MXFP8 linear (MXFP8QuantizationCompressor): <m>.weight float8_e4m3fn [out, in], <m>.weight_scale uint8 E8M0
[out, in / 32]; weights args num_bits 8, type float, strategy group, group_size 32, scale_dtype torch.uint8. Dynamic
MXFP8 and MXFP4 activations are written as their input scheme (group 32, dynamic, uint8 E8M0 scales: compressed-tensors'
MXFP8 / MXFP4 presets). Static-global NVFP4 activations (`QuantSpec.static_global`, recipe nvfp4_w4a4) are written as
compressed-tensors' NVFP4 preset writes them: input_activations {num_bits: 4, type: float, strategy: tensor_group,
group_size: 16, dynamic: local, scale_dtype float8_e4m3fn} and per linear <m>.input_global_scale float32 [1], the
held global G itself (a divisor: compressed-tensors scales each block by e4m3(amax_b / 6 * G) / G, as qat does).
NVFP4 activations whose global comes from each tensor (dynamic: true) have no such form: refused, naming the module.
The codes and exponents are the converted weight's own, so compressed-tensors decodes exactly our values. Read
back, the E2M1 nibbles are held as stored (a negative zero included) and an NVFP4 global that is not qat's power of
two is held with its block scales (`qat.formats.nvfp4.weight_spec_of`): the values are compressed-tensors' own
decompression and a re-export writes the same bytes.
"""
from __future__ import annotations

import torch

from qat.errors import ConfigError
from qat.formats import get_format
from qat.formats.minifloat import e2m1_from_index, e8m0_bytes, e8m0_scale
from qat.formats.fp8_block import expand_bands, fp8_block_spec
from qat.formats.mxfp4 import mxfp4_spec
from qat.formats.mxfp8 import mxfp8_spec
from qat.formats.nvfp4 import nvfp4_spec, stored_scales, weight_spec_of
from qat.modules.quantized import QuantizedWeight
from qat.spec import QuantSpec

FP_FORMATS = {"mxfp4": "mxfp4-pack-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp8": "mxfp8-quantized",
              "fp8_block": "float-quantized"}  # qat format name -> compressed-tensors format


TENSORS = "model.safetensors"  # the file of a compressed-tensors export's tensors (compressed.py writes and reads it)
FP8_WEIGHTS = "fp8_e4m3 per_channel (axis 0) / per_tensor"  # the plain fp8 weight schemes float-quantized holds
_FP8_STRATEGY = {"per_channel": "channel", "per_tensor": "tensor"}
_SCALE_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def is_fp8_weight(spec: QuantSpec) -> bool:
    """Whether `spec` is a plain fp8 weight scheme compressed-tensors' float-quantized format holds (e4m3, static,
    per_channel on the output axis or per_tensor)."""
    return (get_format(spec).name == "fp8" and spec.dtype == "fp8_e4m3" and not spec.dynamic
            and (spec.granularity == "per_tensor" or (spec.granularity == "per_channel" and spec.axis == 0)))


def fp_format(spec: QuantSpec) -> str | None:
    """The compressed-tensors format that holds `spec`'s weights in this module's layouts, or None."""
    return "float-quantized" if is_fp8_weight(spec) else FP_FORMATS.get(get_format(spec).name)


def fp_weights_args(spec: QuantSpec) -> dict:
    """compressed-tensors QuantizationArgs (as JSON) of a float weight scheme `fp_format` holds."""
    if is_fp8_weight(spec):
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": _FP8_STRATEGY[spec.granularity],
                "group_size": None, "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax"}
    if get_format(spec).name == "fp8_block":
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block", "group_size": None,
                "block_structure": [spec.group_size, spec.group_size], "dynamic": False, "actorder": None,
                "observer": "minmax"}
    nv = get_format(spec).name == "nvfp4"
    dtype = "torch.float8_e4m3fn" if nv else "torch.uint8"
    return {"num_bits": spec.bits, "type": "float", "symmetric": True, "strategy": "tensor_group" if nv else "group",
            "group_size": spec.group_size, "dynamic": False, "actorder": None, "observer": "minmax",
            "block_structure": None, "scale_dtype": dtype, "zp_dtype": dtype}


NVFP4_INPUT = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16,
               "dynamic": "local", "observer": "static_minmax", "scale_dtype": "torch.float8_e4m3fn",
               "zp_dtype": "torch.float8_e4m3fn"}  # compressed-tensors' NVFP4 preset's input_activations


def fp_input_args(spec: QuantSpec, name: str = "m") -> dict | None:
    """compressed-tensors input_activations of a microscaling activation scheme: MXFP8 / MXFP4 dynamic (the presets'
    group-32 scheme with E8M0 uint8 scales), NVFP4 static_global (`NVFP4_INPUT`); None for what has no form (static
    MX ranges: the writer warns).

    Raises:
        ConfigError: NVFP4 activations whose global comes from each tensor, naming module `name` and the valid form.
    """
    if get_format(spec).name == "nvfp4":
        if not spec.static_global:
            raise ConfigError(f"compressed-tensors: {name} has NVFP4 activations ({spec.describe()}) whose global "
                              "scale comes from each tensor; compressed-tensors' NVFP4 activations hold a calibrated "
                              "global (input_global_scale): give the input scheme static_global: true, dynamic: false "
                              "(recipe nvfp4_w4a4) and calibrate, or export native")
        return dict(NVFP4_INPUT)
    if get_format(spec).name not in ("mxfp8", "mxfp4") or not spec.dynamic:
        return None
    return {"num_bits": spec.bits, "type": "float", "symmetric": True, "strategy": "group",
            "group_size": spec.group_size, "dynamic": True, "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"}


def nvfp4_input_spec(args: dict) -> QuantSpec | None:
    """The static_global NVFP4 input scheme of an `input_activations` entry in `NVFP4_INPUT`'s form, or None."""
    form = {k: args.get(k) for k in ("num_bits", "type", "strategy", "group_size", "dynamic")}
    fp8 = args.get("scale_dtype") in (None, "torch.float8_e4m3fn", "float8_e4m3fn")
    if form != {k: NVFP4_INPUT[k] for k in form} or not fp8 or args.get("symmetric", True) is not True:
        return None
    return nvfp4_spec(static_global=True)


def input_global_tensors(name: str, quantizer) -> dict[str, torch.Tensor]:
    """`<name>.input_global_scale` (float32 [1]) of a linear whose input quantizer is static_global; else {}."""
    if quantizer is None or not quantizer.spec.static_global:
        return {}
    return {f"{name}.input_global_scale": quantizer.global_scale().detach().float().reshape(1)}


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols / 2] with element 2j in the low nibble of byte j and 2j + 1 in the high nibble."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: uint8 codes [rows, 2 * cols]."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def fp_linear_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one linear in a float format `fp_format` holds."""
    scale, _ = qw.qparams()
    if is_fp8_weight(qw.spec):
        return {f"{name}.weight": qw.codes().reshape(qw.shape).to(torch.float8_e4m3fn),
                f"{name}.weight_scale": (scale.reshape(qw.shape[0], 1) if qw.spec.granularity == "per_channel"
                                         else scale.reshape(1)).to(qw.spec.torch_scale_dtype)}
    if get_format(qw.spec).name == "fp8_block":
        g = qw.spec.group_size
        return {f"{name}.weight": qw.codes().reshape(qw.shape).to(torch.float8_e4m3fn),
                f"{name}.weight_scale": scale[::g].reshape(-(-qw.shape[0] // g), -1).float()}
    if get_format(qw.spec).name == "mxfp8":
        return {f"{name}.weight": qw.codes().reshape(qw.shape).to(torch.float8_e4m3fn),
                f"{name}.weight_scale": e8m0_bytes(scale.reshape(qw.shape[0], -1))}
    out = {f"{name}.weight_packed": qw.packed.reshape(qw.shape[0], -1)}  # qat's 4-bit packing: pack_nibbles' layout
    if get_format(qw.spec).name == "nvfp4":  # the stored bytes: a held (read) global is written back as it came
        blocks, g = stored_scales(qw.scale)
        out[f"{name}.weight_scale"] = blocks.reshape(qw.shape[0], -1)
        out[f"{name}.weight_global_scale"] = g
    else:
        out[f"{name}.weight_scale"] = e8m0_bytes(scale.reshape(qw.shape[0], -1))
    return out


def fp_quantized_weight(t: dict, name: str, w_args: dict, fmt: str, out_f: int, in_f: int) -> QuantizedWeight:
    """The QuantizedWeight of one MXFP4 / NVFP4 / MXFP8 / FP8 linear `name` [out_f, in_f] of a checkpoint in
    compressed-tensors format `fmt`, from its tensors `t`.

    Raises:
        ValueError: a format or weights args this reader does not know, or a codes tensor (weight_packed, weight)
            whose shape does not fit the model's layer, naming the module.
    """
    _check_codes_shape(t, name, fmt, out_f, in_f)
    if fmt == "float-quantized" and w_args.get("strategy") in _FP8_STRATEGY.values():
        return _fp8_weight(t, name, w_args)
    if fmt == "float-quantized" and w_args.get("strategy") == "block":
        b = w_args["block_structure"]
        if b[0] != b[1]:
            raise ConfigError(f"compressed-tensors: {name} has block_structure {b}; qat reads square blocks")
        codes, spec = t[f"{name}.weight"], fp8_block_spec(b[0])
        scale = expand_bands(t[f"{name}.weight_scale"].float().unsqueeze(-1), b[0], codes.shape[0])
        qw = QuantizedWeight(spec, tuple(codes.shape))
        qw.set_codes(codes, scale, None)
        return qw
    known = {"mxfp4-pack-quantized": (4, 32), "nvfp4-pack-quantized": (4, 16), "mxfp8-quantized": (8, 32)}
    if known.get(fmt) != (w_args.get("num_bits"), w_args.get("group_size")):
        raise ConfigError(f"compressed-tensors: {name} has format {fmt!r} with weights {w_args}; qat reads "
                         f"these (format: (num_bits, group_size)): {known}")
    if fmt == "mxfp8-quantized":
        codes = t[f"{name}.weight"]
        scale, spec = e8m0_scale(t[f"{name}.weight_scale"]).reshape(codes.shape[0], -1, 1), mxfp8_spec()
    elif fmt == "nvfp4-pack-quantized":
        return _nvfp4_weight(t, name)
    else:
        codes = _e2m1_codes(t, name)
        scale, spec = e8m0_scale(t[f"{name}.weight_scale"]).reshape(codes.shape[0], -1, 1), mxfp4_spec()
    qw = QuantizedWeight(spec, tuple(codes.shape))
    qw.set_codes(codes, scale, None)
    if fmt == "mxfp4-pack-quantized":
        _keep_nibbles(qw, t[f"{name}.weight_packed"])
    return qw


def _check_codes_shape(t: dict, name: str, fmt: str, out_f: int, in_f: int) -> None:
    """The layer's codes tensor (weight_packed: two E2M1 codes a byte; else weight) has the model layer's shape. Checked
    before its scales, whose expected shape the readers derive from it: a truncated weight_packed was blamed on
    weight_scale. A missing one is left to the readers (named as a missing entry)."""
    packed = fmt in ("mxfp4-pack-quantized", "nvfp4-pack-quantized")
    key, want = (f"{name}.weight_packed", (out_f, -(-in_f // 2))) if packed else (f"{name}.weight", (out_f, in_f))
    codes = t.get(key)
    if codes is not None and tuple(codes.shape) != want:
        raise ConfigError(f"tensor {key} in {TENSORS}: the stored weight is {tuple(codes.shape)} ({codes.dtype}); "
                          f"{fmt} needs {want}{' (two E2M1 codes a byte)' if packed else ''} for the model's layer "
                          f"[out, in] = {(out_f, in_f)}")


def _keep_nibbles(qw: QuantizedWeight, packed: torch.Tensor) -> None:
    """Hold a checkpoint's E2M1 nibbles as stored: qat's 4-bit packing is `pack_nibbles`' layout, and a negative
    zero (pattern 8, which compressed-tensors writes for small negative elements) reads as code 0, so re-packing
    the codes would turn it into pattern 0 (the same value, other bytes on re-export)."""
    qw.packed = packed.to(torch.uint8).reshape(-1).clone()


def _e2m1_codes(t: dict, name: str) -> torch.Tensor:
    """The E2M1 codes of `<name>.weight_packed`, refused unless uint8 [out, in / 2] (compressed-tensors asserts uint8
    when it unpacks: another dtype's bytes are not two nibbles each)."""
    packed = t[f"{name}.weight_packed"]
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ConfigError(f"compressed-tensors: tensor {name}.weight_packed is {packed.dtype} {tuple(packed.shape)}; "
                          "E2M1 codes are packed two per byte: uint8 [out, in / 2]")
    return e2m1_from_index(unpack_nibbles(packed))


def _nvfp4_weight(t: dict, name: str) -> QuantizedWeight:
    """The QuantizedWeight of an nvfp4-pack-quantized linear: E4M3 block scales under the stored global G, held
    as stored where G is not qat's power of two (`weight_spec_of`), so the values are compressed-tensors' own."""
    codes = _e2m1_codes(t, name)
    blocks, g = t[f"{name}.weight_scale"], t.get(f"{name}.weight_global_scale")
    want = (codes.shape[0], codes.shape[1] // 16)
    if blocks.dtype != torch.float8_e4m3fn or tuple(blocks.shape) != want or g is None or g.numel() != 1:
        raise ConfigError(f"compressed-tensors: {name}.weight_scale is {blocks.dtype} {tuple(blocks.shape)}, "
                          f"weight_global_scale {None if g is None else tuple(g.shape)}; nvfp4-pack-quantized needs "
                          f"float8_e4m3fn {want} and a global of one element")
    g = g.float().reshape(1)
    if not bool(torch.isfinite(g).all() and (g > 0).all()):
        raise ConfigError(f"compressed-tensors: tensor {name}.weight_global_scale is {float(g[0])}; the global "
                          "divides the block scales: it must be finite and > 0")
    if not bool((blocks.float() >= 0).all()):  # a NaN fails too; 0 is an all-zero block (qat writes it so)
        raise ConfigError(f"compressed-tensors: tensor {name}.weight_scale holds negative or NaN E4M3 block scales; "
                          "they must be >= 0 (compressed-tensors writes them > 0, qat 0 for an all-zero block)")
    spec = weight_spec_of(blocks, g)
    qw = QuantizedWeight(spec, tuple(codes.shape))
    qw.set_codes(codes, blocks.float().reshape(*want, 1) / g, None, global_scale=g if spec.static_global else None)
    _keep_nibbles(qw, t[f"{name}.weight_packed"])
    return qw


def _fp8_weight(t: dict, name: str, w_args: dict) -> QuantizedWeight:
    """The QuantizedWeight of a float-quantized linear with per-channel / per-tensor fp8 e4m3 weights."""
    codes, scale = t.get(f"{name}.weight"), t.get(f"{name}.weight_scale")
    if w_args.get("num_bits") != 8 or w_args.get("type") != "float" or codes is None or codes.ndim != 2 \
            or codes.dtype != torch.float8_e4m3fn:
        raise ConfigError(f"{name}: num_bits={w_args.get('num_bits')!r}, type={w_args.get('type')!r}, weight "
                          f"{'missing' if codes is None else (codes.dtype, tuple(codes.shape))}; qat reads "
                          "num_bits 8, type float with a float8_e4m3fn [out, in] weight")
    channel = w_args["strategy"] == "channel"
    want = (codes.shape[0], 1) if channel else (1,)
    if scale is None or tuple(scale.shape) != want or scale.dtype not in _SCALE_DTYPES:
        raise ConfigError(f"tensor {name}.weight_scale is "
                          f"{'missing' if scale is None else (scale.dtype, tuple(scale.shape))}; strategy "
                          f"{w_args['strategy']} needs a float {want}")
    spec = QuantSpec(bits=8, dtype="fp8_e4m3", granularity="per_channel" if channel else "per_tensor",
                     scale_dtype=_SCALE_DTYPES[scale.dtype])
    qw = QuantizedWeight(spec, tuple(codes.shape))
    qw.set_codes(codes, scale.float().reshape(want if channel else ()), None)
    return qw
