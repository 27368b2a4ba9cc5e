"""compressed-tensors `pack-quantized` writer and reader (the format vLLM and transformers load).

Per quantized linear `<m>`:
    <m>.weight_packed      int32 [out, ceil(in * bits / 32)]: codes + 2^(bits-1) (signed range), packed
                           densely along the input dim, element i at bit i*bits (LSB first)
    <m>.weight_scale       [out, ceil(in/g)] (group; a ragged last group when g does not divide in), [out, 1] (channel) or [1] (tensor), in the scheme's scale dtype
    <m>.weight_zero_point  (asymmetric only) int32 [ceil(out * bits / 32), ceil(in/g)], signed zero-points packed along dim 0
    <m>.weight_shape       int64 [2]
    <m>.weight_g_idx       (act-order only) int32 [in]
config.json gains `quantization_config` {quant_method: compressed-tensors, format: pack-quantized,
config_groups (one per distinct scheme, targets = module names), ignore, quantization_status: compressed,
kv_cache_scheme}. A static per-tensor symmetric KV-cache scheme (int, or fp8_e4m3: the one vLLM's KV cache takes)
is kv_cache_scheme {strategy: tensor, dynamic: false} with `<attention>.k_scale` / `.v_scale` [1], as
compressed-tensors names them; other KV schemes (per-token dynamic) have no place and are warned about.
Our unsigned asymmetric codes u with zero-point z are stored as u - 2^(bits-1), z - 2^(bits-1): the same
(u - z) * scale. Quantized embeddings are stored dequantized (compressed-tensors packs linears only).
The bit packing is `qat.packing.pack` row by row (same bit order), viewed as little-endian int32.
Linears in a microscaling or block-scaled float format (MXFP4, NVFP4, MXFP8, FP8 blocks) go to `qat.export.compressed_fp` (its own layout and config-group format);
a checkpoint with both kinds of groups has format "mixed-precision".
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from qat.export.compressed_fp import (fp_format, fp_input_args, fp_linear_tensors, fp_quantized_weight,
                                      fp_weights_args)
from qat.export.common import (clear_export_markers, integer_kind, integer_modules, load_rest_and_tie, owning_module,
                               quantizer_prefixes, warn_unstored, weight_of, weight_spec)
from qat.formats import get_format
from qat.io import atomic_path, check_writable, load_safetensors, write_safetensors
from qat.modules.kv_cache import attach_kv_quantizers
from qat.modules.quantized import QuantizedLinear, QuantizedWeight
from qat.packing import pack, unpack
from qat.spec import QuantSpec, TensorSchemes
from qat.transform.prepare import set_module

log = logging.getLogger(__name__)
READ_FORMATS = ("pack-quantized", "mxfp4-pack-quantized", "nvfp4-pack-quantized", "mxfp8-quantized", "float-quantized",
                "mixed-precision")
_STRATEGY = {"per_group": "group", "per_channel": "channel", "per_tensor": "tensor"}


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


def _check_spec(name: str, spec: QuantSpec) -> None:
    if "compressed-tensors" not in get_format(spec).holds or spec.is_float or spec.granularity not in _STRATEGY:
        raise ValueError(f"compressed-tensors pack-quantized: {name} has {spec.describe()}; "
                         "supported: int weights per_tensor / per_channel / per_group on the uniform grid")
    if spec.granularity == "per_channel" and spec.axis != 0:
        raise ValueError(f"compressed-tensors: {name} is per_channel on axis {spec.axis}; only axis 0 (output) is stored")


def _weights_args(spec: QuantSpec, actorder: bool) -> dict:
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "strategy": _STRATEGY[spec.granularity],
            "group_size": spec.group_size, "dynamic": False, "actorder": "group" if actorder else None,
            "observer": "minmax", "block_structure": None}


def _input_args(spec: QuantSpec | None, name: str) -> dict | None:
    if spec is None:
        return None
    if not spec.dynamic:
        raise ValueError(f"compressed-tensors: {name} has a static input scheme ({spec.describe()}); "
                         "only dynamic activation schemes are written")
    kind = "float" if spec.is_float else "int"
    args = {"num_bits": spec.bits, "type": kind, "symmetric": spec.symmetric, "dynamic": True,
            "strategy": "token" if spec.granularity == "per_token" else _STRATEGY[spec.granularity]}
    if spec.granularity == "per_group":  # fp8 1 x 128 activation groups (FP8 block scaling)
        args["group_size"] = spec.group_size
    return args


_KV_TYPES = {"int": "int", "fp8_e4m3": "float"}


def _kv_scheme(model: nn.Module) -> tuple[dict | None, dict[str, nn.Module]]:
    """(kv_cache_scheme, attention modules) when the model's KV-cache scheme is one the format holds (one static
    per-tensor symmetric scheme); else (None, {}), and `warn_unstored` says what is dropped.

    Raises:
        ValueError: a static KV scheme with no calibrated range yet (naming the module).
    """
    attention = {n: m for n, m in model.named_modules() if getattr(m, "k_quantizer", None) is not None}
    specs = {q.spec for m in attention.values() for q in (m.k_quantizer, m.v_quantizer)}
    spec = next(iter(specs)) if len(specs) == 1 else None
    if spec is None or spec.dynamic or spec.granularity != "per_tensor" or not spec.symmetric \
            or spec.learn != "none" or spec.grid != "uniform" or spec.dtype not in _KV_TYPES:
        return None, {}
    for n, m in attention.items():
        if not (m.k_quantizer.initialized and m.v_quantizer.initialized):
            raise ValueError(f"compressed-tensors export: {n} has a static KV-cache scheme ({spec.describe()}) with no "
                             "range yet; calibrate the model (qat.calibrate) first")
    args = {"num_bits": spec.bits, "type": _KV_TYPES[spec.dtype], "symmetric": True, "strategy": "tensor",
            "dynamic": False, "group_size": None, "observer": "minmax", "block_structure": None, "actorder": None}
    return args, attention


def _kv_tensors(attention: dict[str, nn.Module]):
    for n, m in attention.items():
        for kind, quantizer in (("k", m.k_quantizer), ("v", m.v_quantizer)):
            scale = quantizer.qparams(torch.empty(0))[0]
            yield f"{n}.{kind}_scale", scale.detach().reshape(1).to(quantizer.spec.torch_scale_dtype)


def _attach_kv(model: nn.Module, t: dict, kv: dict, folder: Path) -> None:
    """KV-cache quantizers on the attention modules with `k_scale` / `v_scale`, pinned to those scales."""
    names = sorted(k.removesuffix(".k_scale") for k in t if k.endswith(".k_scale"))
    if kv.get("dynamic") or kv.get("strategy") != "tensor" or not kv.get("symmetric") or not names \
            or kv.get("type") not in _KV_TYPES.values():
        raise ValueError(f"{str(folder)!r}: kv_cache_scheme {kv} is not one qat reads (static, strategy tensor, "
                         "symmetric, int or float, with <attention>.k_scale / .v_scale tensors)")
    scale_dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(t[f"{names[0]}.k_scale"].dtype, "fp32")
    dtype = "int" if kv["type"] == "int" else "fp8_e4m3"
    spec = QuantSpec(bits=kv["num_bits"], dtype=dtype, symmetric=True, granularity="per_tensor", scale_dtype=scale_dtype)
    attach_kv_quantizers(model, {n: model.get_submodule(n) for n in names}, spec)
    for n in names:
        module = model.get_submodule(n)
        module.k_quantizer.set_qparams(t[f"{n}.k_scale"].float().reshape(()))
        module.v_quantizer.set_qparams(t[f"{n}.v_scale"].float().reshape(()))


def _linear_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    spec, half = qw.spec, 2 ** (qw.spec.bits - 1)
    signed = qw.codes().to(torch.int16) - (0 if spec.signed else half)
    out = {f"{name}.weight_packed": pack_int32((signed + half).to(torch.uint8), spec.bits),
           f"{name}.weight_shape": torch.tensor(qw.shape, dtype=torch.int64)}
    scale, zp = qw.qparams()
    scale = scale.reshape(qw.shape[0], -1) if scale.ndim else scale.reshape(1)
    out[f"{name}.weight_scale"] = scale.to(spec.torch_scale_dtype)
    if zp is not None:
        zs = zp.reshape(qw.shape[0], -1).to(torch.int16) - half + half  # signed zp + offset = unsigned zp
        out[f"{name}.weight_zero_point"] = pack_int32(zs.t().to(torch.uint8), spec.bits).t().contiguous()
    if qw.group_index() is not None:
        out[f"{name}.weight_g_idx"] = qw.group_index().to(torch.int32)
    return out


def _plan(model: nn.Module) -> tuple[dict, dict, dict]:
    """(integer modules, quantized linears, config_groups), every scheme checked before anything is written."""
    modules = integer_modules(model)
    linears = {n: m for n, m in modules.items() if integer_kind(m) is QuantizedLinear}
    if not linears:
        raise ValueError("compressed-tensors export: the model has no quantized linear layers")
    groups: dict[str, dict] = {}
    ragged: list[str] = []
    fp_inputs: list[str] = []
    for n, m in linears.items():
        spec, actorder = weight_spec(model, f"{n}.weight")
        fmt = fp_format(spec) if spec is not None else None
        if fmt is None:
            _check_spec(n, spec)
        if spec.granularity == "per_group" and m.in_features % spec.group_size:
            ragged.append(n)
        w_args = fp_weights_args(spec) if fmt else _weights_args(spec, actorder)
        i_spec = m.input_quantizer.spec if m.input_quantizer is not None else None
        if i_spec is not None and fp_format(i_spec):
            i_args = fp_input_args(i_spec)
            if i_args is None:
                fp_inputs.append(n)
        else:
            i_args = _input_args(i_spec, n)
        key = json.dumps([w_args, i_args], sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": w_args, "input_activations": i_args,
                                "output_activations": None, "format": fmt or "pack-quantized"})["targets"].append(n)
    if ragged:
        log.warning("compressed-tensors: %d layer(s) have ragged last groups (group size not dividing in_features: "
                    "%s); qat's loader reads them, but compressed-tensors 0.20 (transformers) refuses such layers",
                    len(ragged), ", ".join(ragged[:3]) + (", ..." if len(ragged) > 3 else ""))
    if fp_inputs:
        log.warning("compressed-tensors: %d layer(s) have dynamic 4-bit float activations (%s); compressed-tensors' "
                    "fp4 activation schemes need a calibrated static input_global_scale, so they are written without "
                    "an input scheme (weights only)", len(fp_inputs),
                    ", ".join(fp_inputs[:3]) + (", ..." if len(fp_inputs) > 3 else ""))
    return modules, linears, groups


def _tensors(model: nn.Module, modules: dict, linears: dict, attention: dict):
    """(name, tensor) of the checkpoint, one module at a time (each linear quantized when its turn comes)."""
    yield from _kv_tensors(attention)
    for n, m in linears.items():
        qw = weight_of(model, f"{n}.weight")
        yield from (fp_linear_tensors(n, qw) if fp_format(qw.spec) else _linear_tensors(n, qw)).items()
        if m.bias is not None:
            yield f"{n}.bias", m.bias.detach()
    for n, m in modules.items():
        if n not in linears:
            yield f"{n}.weight", weight_of(model, f"{n}.weight").dequantize()
    tied = getattr(model.config, "tie_word_embeddings", False)
    quantizers = quantizer_prefixes(model)  # input and KV-cache state: written as the scheme allows, or warned
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor) or key.startswith(quantizers) or (tied and key == "lm_head.weight"):
            continue
        if owning_module(key, modules) is None:
            yield key, value


def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write a (prepared or converted) model as a compressed-tensors pack-quantized checkpoint, streaming:
    each linear is quantized, packed and written in turn (memory: the model plus one tensor's worth).

    Raises:
        ValueError: a weight scheme the format cannot hold (named), a static input scheme, no quantized module.
    Example:
        >>> export_compressed_tensors(qat.prepare(model, qat.load_recipe("w4a16_g128")), "out/ct")
        >>> AutoModelForCausalLM.from_pretrained("out/ct")
    """
    modules, linears, groups = _plan(model)
    kv_scheme, attention = _kv_scheme(model)
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in linears)
    formats = {g["format"] for g in groups.values()}
    top = formats.pop() if len(formats) == 1 else "mixed-precision"
    qconfig = {"quant_method": "compressed-tensors", "format": top, "quantization_status": "compressed",
               "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())}, "ignore": ignore,
               "kv_cache_scheme": kv_scheme, "global_compression_ratio": None}
    warn_unstored(model, "compressed-tensors", stores_input=True, stores_kv=kv_scheme is not None)
    out = Path(out_dir)
    check_writable(out / "config.json")
    clear_export_markers(out)  # an old export here must not look complete beside a partial new one
    with torch.no_grad():
        write_safetensors(_tensors(model, modules, linears, attention), out / "model.safetensors", metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    with atomic_path(out / "config.json") as tmp:  # written last: marks the export complete
        tmp.write_text(json.dumps(config, indent=2, default=str))
    return out


def _spec_from_args(w: dict, scale_dtype: torch.dtype, in_features: int) -> QuantSpec:
    gran = {v: k for k, v in _STRATEGY.items()}[w["strategy"]]
    sd = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(scale_dtype, "fp32")
    group = w.get("group_size") if gran == "per_group" else None
    ragged = bool(group and in_features % group)  # ceil(in / g) groups, the last one shorter
    return QuantSpec(bits=w["num_bits"], symmetric=w["symmetric"], granularity=gran, group_size=group,
                     ragged=ragged, scale_dtype=sd)


def _quantized_weight(t: dict, n: str, w_args: dict) -> QuantizedWeight:
    scale = t[f"{n}.weight_scale"]
    shape = tuple(int(s) for s in t[f"{n}.weight_shape"])
    spec = _spec_from_args(w_args, scale.dtype, shape[1])
    half = 2 ** (spec.bits - 1)
    u = unpack_int32(t[f"{n}.weight_packed"], spec.bits, shape[1]).to(torch.int16)
    codes = (u - half).to(torch.int8) if spec.signed else u.to(torch.uint8)
    scale = scale.float().reshape({"per_group": (shape[0], -1, 1), "per_channel": (shape[0], 1)}.get(spec.granularity, ()))
    zp = None
    if not spec.symmetric:
        zpu = unpack_int32(t[f"{n}.weight_zero_point"].t().contiguous(), spec.bits, shape[0]).t()
        zp = zpu.float().reshape(scale.shape)
    qw = QuantizedWeight(spec, shape)
    if f"{n}.weight_g_idx" in t:
        qw.g_idx = t[f"{n}.weight_g_idx"].to(torch.int64)
    qw.set_codes(codes, scale, zp)
    return qw


def load_compressed_tensors(path: str | os.PathLike) -> nn.Module:
    """Read a pack-quantized checkpoint into a model with QuantizedLinear modules (our loader).

    Raises:
        ValueError: not a pack-quantized compressed-tensors folder, or corrupted tensors.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    raw = json.loads((folder / "config.json").read_text())
    q = raw.get("quantization_config") or {}
    if q.get("quant_method") != "compressed-tensors" or q.get("format") not in READ_FORMATS:
        raise ValueError(f"{str(folder)!r}: not a compressed-tensors pack-quantized checkpoint "
                         f"(quant_method={q.get('quant_method')!r}, format={q.get('format')!r})")
    t = load_safetensors(folder / "model.safetensors")
    config = AutoConfig.from_pretrained(str(folder))
    config.quantization_config = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    stored = set()  # the quantized linears' own tensors (an fp8 checkpoint's `<m>.weight` among them)
    for group in q["config_groups"].values():
        for n in group["targets"]:
            stored.add(f"{n}.weight")
            old = model.get_submodule(n)
            fmt = group.get("format") or q["format"]
            qw = (_quantized_weight(t, n, group["weights"]) if fmt == "pack-quantized"
                  else fp_quantized_weight(t, n, group["weights"], fmt))
            bias = old.bias if old.bias is not None else None
            set_module(model, n, QuantizedLinear(old.in_features, old.out_features, qw, bias, None, TensorSchemes(weight=qw.spec)))
    if q.get("kv_cache_scheme"):
        _attach_kv(model, t, q["kv_cache_scheme"], folder)
    rest = {k: v for k, v in t.items()
            if ".weight_" not in k and k not in stored and not k.endswith((".k_scale", ".v_scale"))}
    return load_rest_and_tie(model, rest, folder, config)
