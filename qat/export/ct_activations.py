"""compressed-tensors `input_activations` <-> qat input schemes, both ways: what the writer stores for a linear's
input quantizer, and the input quantizer the loader re-attaches from a config group's `input_activations`.

Read back (each exactly what qat computes for the same QuantSpec):
    int, dynamic, strategy token / tensor / group     -> dynamic int input (w8a8's and w4a8_kv4_rot's A8)
    float 8, dynamic, token / tensor / group          -> dynamic fp8 e4m3 (fp8 1x128 groups: FP8 block scaling)
    float 8 or 4, dynamic, group 32, uint8 scales     -> dynamic MXFP8 / MXFP4 (E8M0 block scales)
    int / float 8, static, strategy tensor            -> a static per-tensor input pinned to `<m>.input_scale`
                                                         (and `<m>.input_zero_point` when asymmetric)
    float 4, dynamic local, tensor_group 16, fp8      -> NVFP4 static_global input, its global pinned to
                                                         `<m>.input_global_scale` (compressed-tensors' NVFP4 preset)
Anything else (another `dynamic: local` scheme, static per-channel / group ranges, output activations) is not
re-attached: the loader warns, naming the modules and the scheme, and runs them on float inputs.
"""
from __future__ import annotations

from typing import Any

import torch

from qat.errors import ConfigError
from qat.export.compressed_fp import FP_FORMATS, fp_input_args, nvfp4_input_spec
from qat.formats import get_format
from qat.modules.quantizer import TensorQuantizer
from qat.spec import QuantSpec

STRATEGY = {"per_group": "group", "per_channel": "channel", "per_tensor": "tensor", "per_token": "token"}
# a linear's tensors of its input scheme: read (static scale, zero-point) or warned about with it (NVFP4's global scale)
INPUT_TENSORS = ("input_scale", "input_zero_point", "input_global_scale")
_SCALE_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def input_args(spec: QuantSpec | None, name: str, quantizer: TensorQuantizer | None = None) -> dict | None:
    """compressed-tensors input_activations of a linear's input scheme (None: no input scheme, or a float one
    the format cannot hold, which the writer warns about). `quantizer`: the linear's input quantizer, whose held
    global (static_global NVFP4) must be calibrated by now.

    Raises:
        ConfigError: a static input scheme (only dynamic ones, and NVFP4's static global, are written), NVFP4
            activations with a per-tensor dynamic global, a static global with no range yet, or a clipped dynamic
            scheme (clip_ratio < 1, which the format has no field for), naming the module.
    """
    if spec is None:
        return None
    if quantizer is not None and spec.static_global and not quantizer.initialized:
        raise ConfigError(f"compressed-tensors export: {name} has a static-global input scheme ({spec.describe()}) "
                          "with no range yet; calibrate the model (qat.calibrate) or run it on some batches first")
    if spec.clip_ratio != 1.0:
        raise ConfigError(f"compressed-tensors: {name} clips its dynamic input scheme ({spec.describe()}: "
                          f"clip_ratio={spec.clip_ratio:g}); compressed-tensors' input_activations have no clip "
                          "ratio, so a runtime would quantize these inputs otherwise; format=native stores it (a model "
                          "for this format: quant.input.clip_ratio=1)")
    if get_format(spec).name in FP_FORMATS:  # the microscaling formats' own activation schemes
        return fp_input_args(spec, name)
    if not spec.dynamic:
        raise ConfigError(f"compressed-tensors: {name} has a static input scheme ({spec.describe()}); "
                          "only dynamic activation schemes are written")
    args = {"num_bits": spec.bits, "type": "float" if spec.is_float else "int", "symmetric": spec.symmetric,
            "dynamic": True, "strategy": STRATEGY[spec.granularity]}
    if spec.granularity == "per_group":  # fp8 1 x 128 activation groups (FP8 block scaling)
        args["group_size"] = spec.group_size
    return args


def input_spec(args: dict, scale_dtype: torch.dtype | None = None) -> QuantSpec | str:
    """The QuantSpec of an `input_activations` entry, or the reason qat cannot re-attach it (a string).

    Args:
        scale_dtype: the stored `input_scale`'s dtype (static schemes), which the spec's scale dtype follows.
    Example:
        >>> input_spec({"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token"})
        QuantSpec(bits=8, ..., granularity='per_token', ..., dynamic=True, ...)
    """
    kind, bits, strategy, dynamic = args.get("type", "int"), args.get("num_bits"), args.get("strategy"), args.get("dynamic")
    group = args.get("group_size")
    gran = {v: k for k, v in STRATEGY.items()}.get(strategy)
    if dynamic == "local" and nvfp4_input_spec(args) is not None:
        return nvfp4_input_spec(args)
    if dynamic is not True and dynamic is not False:
        return f"dynamic={dynamic!r} (a stored global scale with local dynamic scales, other than NVFP4's)"
    if gran is None or (gran == "per_group" and not (type(group) is int and group > 0)):
        return f"strategy={strategy!r}" + (f", group_size={group!r}" if strategy == "group" else "")
    if not dynamic and gran != "per_tensor":
        return f"static {strategy} ranges (qat reads static input ranges per tensor)"
    fields: dict[str, Any] = {"bits": bits, "symmetric": args.get("symmetric", True), "granularity": gran,
                              "group_size": group if gran == "per_group" else None, "dynamic": bool(dynamic)}
    if kind == "float":
        mx = args.get("scale_dtype") in ("torch.uint8", "uint8") and gran == "per_group"
        dtype = {8: "fp8_e4m3", 4: "fp4_e2m1"}.get(bits)
        if dtype is None or (dtype == "fp4_e2m1" and not (mx and dynamic)):
            return f"float {bits}-bit activations" + ("" if dtype is None else " without E8M0 group scales (NVFP4)")
        fields.update(dtype=dtype, grid="mx" if mx else "uniform")
    elif kind != "int":
        return f"type={kind!r}"
    if scale_dtype is not None:
        fields["scale_dtype"] = _SCALE_DTYPES.get(scale_dtype, "fp32")
    try:
        return QuantSpec(**fields)
    except ValueError as err:
        return str(err)


def input_quantizer(args: dict, in_features: int, tensors: dict, name: str) -> TensorQuantizer | str:
    """The input quantizer of linear `name` from its group's `input_activations`: dynamic, static pinned to
    the stored `<name>.input_scale` (and `<name>.input_zero_point`, stored signed as compressed-tensors does:
    qat's unsigned zero-point is it + 2^(bits-1)), or NVFP4 static-global pinned to `<name>.input_global_scale`;
    or the reason qat cannot re-attach it (a string).

    Raises:
        ConfigError: a static scheme whose scale (zero-point) tensor is missing or not one number, or an NVFP4
            scheme without its one `<name>.input_global_scale`, naming the tensor.
    """
    scale = tensors.get(f"{name}.input_scale")
    spec = input_spec(args, None if scale is None or args.get("dynamic") else scale.dtype)
    if isinstance(spec, str):
        return spec
    quantizer = TensorQuantizer(spec, "input", torch.zeros(1, in_features))
    if spec.dynamic:
        return quantizer
    if spec.static_global:
        g = tensors.get(f"{name}.input_global_scale")
        if g is None or g.numel() != 1 or not g.is_floating_point():
            raise ConfigError(f"tensor {name}.input_global_scale is "
                              f"{'missing' if g is None else (g.dtype, tuple(g.shape))}; NVFP4 input_activations "
                              "(dynamic: local) need one float global scale")
        quantizer.set_qparams(g.float().reshape(()))
        return quantizer
    if scale is None or scale.numel() != 1:
        raise ConfigError(f"tensor {name}.input_scale is {'missing' if scale is None else tuple(scale.shape)}; "
                          "a static per-tensor input scheme needs one scale")
    zero_point = None
    if not spec.symmetric:
        zp = tensors.get(f"{name}.input_zero_point")
        if zp is None or zp.numel() != 1:
            raise ConfigError(f"tensor {name}.input_zero_point is missing or not one number; an asymmetric "
                              "static input scheme needs it")
        zero_point = zp.float().reshape(()) + (0 if spec.signed else 2 ** (spec.bits - 1))
    quantizer.set_qparams(scale.float().reshape(()), zero_point)
    return quantizer
