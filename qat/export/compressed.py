"""compressed-tensors `pack-quantized` writer and reader (the format vLLM and transformers load).

Per quantized linear `<m>`:
    <m>.weight_packed      int32 [out, ceil(in * bits / 32)]: codes + 2^(bits-1) (signed range), packed
                           densely along the input dim, element i at bit i*bits (LSB first)
    <m>.weight_scale       [out, ceil(in/g)] (group; a ragged last group when g does not divide in), [out, 1] (channel) or [1] (tensor), in the scheme's scale dtype
    <m>.weight_zero_point  (asymmetric only) int32 [out, ceil(in/g)]: signed zero-points packed along dim 0 in
                           the first ceil(out * bits / 32) rows, zero rows after (`ZERO_POINT_LAYOUTS`)
    <m>.weight_shape       int64 [2]
    <m>.weight_g_idx       (act-order only) int32 [in]
config.json gains `quantization_config` {quant_method: compressed-tensors, format: pack-quantized,
config_groups (one per distinct scheme, targets = module names; the reader also resolves class names and "re:"
regexes with `ignore`, as other writers use them: `qat.export.ct_targets`), ignore, quantization_status: compressed,
kv_cache_scheme, transform_config}. A static per-tensor symmetric KV-cache scheme (int, or fp8_e4m3: the one
vLLM's KV cache takes) is kv_cache_scheme {strategy: tensor, dynamic: false} with `<attention>.k_scale` /
`.v_scale` [1], as compressed-tensors names them; other KV schemes (per-token dynamic) have no place and are warned about.
Dynamic input schemes (and NVFP4's static global: `<m>.input_global_scale`) are each group's `input_activations`,
re-attached by the loader (`qat.export.ct_activations`).
Online rotations (R3, R4, llama.cpp's KV rotation) of power-of-two sizes go to `transform_config`
(`qat.export.ct_transforms`, read back by the loader); others are warned about.
Fused MoE experts (`QuantizedExperts`, transformers' `mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj`) are written
in the per-expert layout vLLM and llm-compressor use: `<experts>.{i}.gate_proj` / `.up_proj` (the two row halves of
gate_up_proj) / `.down_proj`, each a linear as above (a per_tensor scheme: one scale per expert and projection).
Our unsigned asymmetric codes u with zero-point z are stored as u - 2^(bits-1), z - 2^(bits-1): the same
(u - z) * scale. Quantized embeddings are stored dequantized (compressed-tensors packs linears only).
The bit packing is `qat.packing.pack` row by row (same bit order), viewed as little-endian int32.
Linears in a float format (fp8 e4m3 per channel / tensor, MXFP4, NVFP4, MXFP8, FP8 blocks) go to `qat.export.compressed_fp` (its own layout and config-group format);
a checkpoint with both kinds of groups has format "mixed-precision".
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from qat.arch import find_arch
from qat.errors import BadFileError, ConfigError
from qat.export.compressed_fp import (FP8_WEIGHTS, FP_FORMATS, fp_format, fp_linear_tensors, fp_quantized_weight,
                                     fp_weights_args, input_global_tensors)
from qat.export.ct_activations import INPUT_TENSORS, input_args, input_quantizer, input_spec
from qat.export.ct_targets import group_targets, module_classes, stored_layers
from qat.export.ct_transforms import attach_transforms, transform_config
from qat.export.common import (integer_kind, integer_modules, load_rest_and_tie, owning_module,
                               quantizer_prefixes, stored_float_dtype, warn_unstored, weight_of, weight_spec)
from qat.export.publish import folder_writer
from qat.export.validate import bad_file, check_config, check_model, check_state, read_json, verify_checksums
from qat.formats import get_format
from qat.io import atomic_path, check_writable, load_safetensors, write_safetensors
from qat.modules.experts import QuantizedExperts, expert_weight_names, is_experts
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


MX_INPUTS = ("mxfp4", "mxfp8")  # dynamic activations written as compressed-tensors' scheme, scaled otherwise there
EXPERT_WEIGHTS = "int weights only (per_tensor / per_channel / per_group on the uniform grid)"


def _check_expert_spec(name: str, spec: QuantSpec) -> None:
    """Fused MoE experts are written as pack-quantized int groups only; the float formats are Linear-only."""
    if spec.is_float or fp_format(spec) is not None:
        raise ConfigError(f"compressed-tensors: {name} has {spec.describe()} on fused MoE experts; experts take "
                          f"{EXPERT_WEIGHTS}, while {FP8_WEIGHTS} and {' / '.join(FP_FORMATS)} weights are written "
                          "for Linear layers only (give the experts an int scheme, e.g. an override with targets: "
                          "[Experts], or ignore them)")
    _check_spec(name, spec)


def _check_spec(name: str, spec: QuantSpec) -> None:
    if "compressed-tensors" not in get_format(spec).holds or spec.is_float or spec.granularity not in _STRATEGY:
        raise ConfigError(f"compressed-tensors: {name} has {spec.describe()}; supported: int weights per_tensor / "
                         f"per_channel / per_group on the uniform grid, {FP8_WEIGHTS} weights, or "
                         f"{' / '.join(FP_FORMATS)} weights (the microscaling / block-scaled float formats)")
    if spec.granularity == "per_channel" and spec.axis != 0:
        raise ConfigError(f"compressed-tensors: {name} is per_channel on axis {spec.axis}; only axis 0 (output) is stored")


def check_schemes(schemes: TensorSchemes, name: str, experts: bool = False) -> None:
    """Refuse a module's schemes this format cannot hold (the writer's own per-module checks), so that a job can
    refuse a recipe before it loads or quantizes anything; `experts`: the schemes reach fused MoE experts.

    Raises:
        ConfigError: a weight scheme that is neither int nor a microscaling float format (for experts: not int),
            or a static input scheme, naming `name` (a module, or a recipe's key).
    """
    if schemes.weight is not None and experts:
        _check_expert_spec(name, schemes.weight)
    elif schemes.weight is not None and fp_format(schemes.weight) is None:
        _check_spec(name, schemes.weight)
    input_args(schemes.input, name)


def _weights_args(spec: QuantSpec, actorder: bool) -> dict:
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "strategy": _STRATEGY[spec.granularity],
            "group_size": spec.group_size, "dynamic": False, "actorder": "group" if actorder else None,
            "observer": "minmax", "block_structure": None}


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
            raise ConfigError(f"compressed-tensors export: {n} has a static KV-cache scheme ({spec.describe()}) with no "
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
        raise ConfigError(f"{str(folder)!r}: kv_cache_scheme {kv} is not one qat reads (static, strategy tensor, "
                         "symmetric, int or float, with <attention>.k_scale / .v_scale tensors)")
    scale_dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(t[f"{names[0]}.k_scale"].dtype, "fp32")
    dtype = "int" if kv["type"] == "int" else "fp8_e4m3"
    spec = QuantSpec(bits=kv["num_bits"], dtype=dtype, symmetric=True, granularity="per_tensor", scale_dtype=scale_dtype)
    attach_kv_quantizers(model, {n: model.get_submodule(n) for n in names}, spec)
    for n in names:
        module = model.get_submodule(n)
        module.k_quantizer.set_qparams(t[f"{n}.k_scale"].float().reshape(()))
        module.v_quantizer.set_qparams(t[f"{n}.v_scale"].float().reshape(()))


# How asymmetric zero-points are stored. "padded" (the default): int32 [out, groups], the packed words in the first
# ceil(out * bits / 32) rows and zeros after. That is the parameter transformers 5 + compressed-tensors 0.20 create
# before loading (transformers compresses the meta model with compressed-tensors' compress_model, whose meta
# branch in compressors/pack_quantized/base.py leaves the zero-point unpacked, [out, groups]), and their
# decompress unpacks only the first rows: such a checkpoint loads there with equal logits. "packed":
# [ceil(out * bits / 32), groups], as compressed-tensors' own compressor writes it (the shape vLLM's wNa16 loader
# allocates); that transformers refuses it (size mismatch). qat's loader reads both.
ZERO_POINT_LAYOUTS = ("padded", "packed")


def _linear_tensors(name: str, qw: QuantizedWeight, zero_points: str = "padded") -> dict[str, torch.Tensor]:
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


EXPERT_PROJ = re.compile(r"^(?P<experts>.+)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


class _ExpertSlice:
    """One expert's gate / up / down projection, cut from the unpacked (codes, scale, zero-point) of an expert
    weight's 2-D view (`qat.modules.experts.to_rows`), with the QuantizedWeight methods `_linear_tensors` reads."""

    def __init__(self, unpacked, spec: QuantSpec, n_experts: int, e: int, rows: slice, shape) -> None:
        self.unpacked, self.spec, self.n, self.e, self.rows, self.shape = unpacked, spec, n_experts, e, rows, tuple(shape)

    def _cut(self, t: torch.Tensor | None, codes: bool = False) -> torch.Tensor | None:
        if t is None:
            return None
        if self.spec.granularity == "per_tensor":  # the view is [E, O * I] with one scale per expert
            return t[self.e].reshape(-1, self.shape[1])[self.rows] if codes else t[self.e].reshape(())
        per = t.shape[0] // self.n
        return t[self.e * per:(self.e + 1) * per][self.rows]

    def codes(self) -> torch.Tensor:
        return self._cut(self.unpacked()[0], codes=True)

    def qparams(self):
        _, scale, zp = self.unpacked()
        return self._cut(scale), self._cut(zp)

    def group_index(self):
        return None


def expert_linears(name: str, module: nn.Module, qw_of) -> dict[str, _ExpertSlice]:
    """{`<experts>.{i}.<proj>`: its slice} for fused experts `module` called `name`; `qw_of(weight)` gives the
    QuantizedWeight of an expert weight (unpacked once, on first use)."""
    out = {}
    spec = module.schemes.weight
    for weight in _weight_names(module):
        n_exp, rows, cols = module.shapes[weight]
        unpacked = _once(lambda w=weight: (lambda qw: (qw.codes(), *qw.qparams()))(qw_of(w)))
        halves = ([("gate_proj", slice(0, rows // 2)), ("up_proj", slice(rows // 2, rows))] if weight == "gate_up_proj"
                  else [(weight, slice(0, rows))])
        for e in range(n_exp):
            for proj, sl in halves:
                out[f"{name}.{e}.{proj}"] = _ExpertSlice(unpacked, spec, n_exp, e, sl, (sl.stop - sl.start, cols))
    return out


def _once(fn):
    cache = []
    return lambda: cache[0] if cache else (cache.append(fn()) or cache[0])


def _weight_names(module: nn.Module) -> list[str]:
    held = getattr(module, "qweights", None) or getattr(module, "weight_quantizers", None)
    return list(held)


def _plan(model: nn.Module) -> tuple[dict, dict, dict]:
    """(integer modules, quantized linears, config_groups), every scheme checked before anything is written."""
    modules = integer_modules(model)
    linears = {n: m for n, m in modules.items() if integer_kind(m) is QuantizedLinear}
    experts = {n: m for n, m in modules.items() if integer_kind(m) is QuantizedExperts}
    if not linears and not experts:
        raise ConfigError("compressed-tensors export: the model has no quantized linear layers")
    groups: dict[str, dict] = {}
    ragged: list[str] = []
    for n, m in experts.items():
        if m.transposed:
            raise ConfigError(f"compressed-tensors export: {n} stores transposed expert weights; not supported")
        spec = m.schemes.weight
        _check_expert_spec(n, spec)
        w_args = _weights_args(spec, False)
        key = json.dumps([w_args, None], sort_keys=True)
        group = groups.setdefault(key, {"targets": [], "weights": w_args, "input_activations": None,
                                        "output_activations": None, "format": "pack-quantized"})
        group["targets"] += list(expert_linears(n, m, lambda w: None))
    fp_inputs: dict[QuantSpec, list[str]] = {}
    mx_inputs: dict[str, list[str]] = {}
    inexact: dict[str, list[str]] = {}
    for n, m in linears.items():
        spec, actorder = weight_spec(model, f"{n}.weight")
        fmt = fp_format(spec) if spec is not None else None
        if fmt is None:
            _check_spec(n, spec)
        if spec.granularity == "per_group" and m.in_features % spec.group_size:
            ragged.append(n)
        w_args = fp_weights_args(spec) if fmt else _weights_args(spec, actorder)
        i_spec = m.input_quantizer.spec if m.input_quantizer is not None else None
        i_args = input_args(i_spec, n, m.input_quantizer)
        if i_spec is not None and i_args is None:
            fp_inputs.setdefault(i_spec, []).append(n)
        elif i_args is not None and get_format(i_spec).name in MX_INPUTS:
            mx_inputs.setdefault(get_format(i_spec).name.upper(), []).append(n)
        if i_args is not None and input_spec(i_args) != i_spec:  # a field the args have no place for
            inexact.setdefault(i_spec.describe(), []).append(n)
        key = json.dumps([w_args, i_args], sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": w_args, "input_activations": i_args,
                                "output_activations": None, "format": fmt or "pack-quantized"})["targets"].append(n)
    if ragged:
        log.warning("compressed-tensors: %d layer(s) have ragged last groups (group size not dividing in_features: "
                    "%s); qat's loader reads them, but compressed-tensors 0.20 (transformers) refuses such layers",
                    len(ragged), ", ".join(ragged[:3]) + (", ..." if len(ragged) > 3 else ""))
    for i_spec, names in fp_inputs.items():
        log.warning("compressed-tensors: %d layer(s) have %s activations (%s: %s); only dynamic MXFP8 / MXFP4 "
                    "activations have an input_activations form, so they are written without an input scheme "
                    "(weights only)", len(names), get_format(i_spec).name.upper(), i_spec.describe(),
                    ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""))
    if mx_inputs:  # once per export: the scheme is the right one, but its runtime computes other scales
        recipe = getattr(getattr(model, "qat_recipe", None), "name", None) or "the model's"
        log.warning("compressed-tensors: recipe %s: dynamic %s activations of %d layer(s) are written as "
                    "compressed-tensors' own scheme, but a runtime computes their E8M0 scales its own way: "
                    "compressed-tensors 0.20 rounds the block scale up from amax / (largest code) (block max 7.5 in "
                    "MXFP4: scale 2, value 8), qat from floor(log2(amax)) - emax with saturation (scale 1, value 6); "
                    "the deployed model does not compute exactly what the fake-quant model did (qat's own loader "
                    "does)", recipe, " / ".join(sorted(mx_inputs)), sum(map(len, mx_inputs.values())))
    for scheme, names in inexact.items():
        log.warning("compressed-tensors: the input scheme %s of %d layer(s) (%s) has settings input_activations "
                    "cannot hold (observer, scale dtype, ...); loaders re-attach the scheme without them",
                    scheme, len(names), ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""))
    return modules, {**linears, **experts}, groups


def _tensors(model: nn.Module, modules: dict, linears: dict, attention: dict, zero_points: str = "padded"):
    """(name, tensor) of the checkpoint, one module at a time (each linear quantized when its turn comes)."""
    yield from _kv_tensors(attention)
    for n, m in linears.items():
        if integer_kind(m) is QuantizedExperts:  # each expert weight quantized once, written expert by expert
            held = {w: weight_of(model, f"{n}.{w}") for w in _weight_names(m)}
            for sub, piece in expert_linears(n, m, held.__getitem__).items():
                yield from _linear_tensors(sub, piece, zero_points).items()
            for key, value in m.named_parameters():  # expert biases (none in the supported families)
                if key not in held and not key.startswith("weight_quantizers."):
                    yield f"{n}.{key}", value.detach()
            continue
        qw = weight_of(model, f"{n}.weight")
        yield from (fp_linear_tensors(n, qw) if fp_format(qw.spec) else _linear_tensors(n, qw, zero_points)).items()
        yield from input_global_tensors(n, m.input_quantizer).items()  # NVFP4's static activation global
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


@folder_writer
def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None,
                              zero_points: str = "padded") -> Path:
    """Write a (prepared or converted) model as a compressed-tensors pack-quantized checkpoint, streaming:
    each linear is quantized, packed and written in turn (memory: the model plus one tensor's worth).

    Args:
        zero_points: how asymmetric zero-points are laid out, "padded" (transformers loads it) or "packed"
            (compressed-tensors' compressor's shape); see `ZERO_POINT_LAYOUTS`.
    Raises:
        ValueError: a weight scheme the format cannot hold (named), a static input scheme, no quantized module.
    Example:
        >>> export_compressed_tensors(qat.prepare(model, qat.load_recipe("w4a16_g128")), "out/ct")
        >>> AutoModelForCausalLM.from_pretrained("out/ct")
    """
    if zero_points not in ZERO_POINT_LAYOUTS:
        raise ConfigError(f"zero_points={zero_points!r}; choose from {list(ZERO_POINT_LAYOUTS)}")
    modules, linears, groups = _plan(model)
    kv_scheme, attention = _kv_scheme(model)
    arch = find_arch(model)
    ck = (lambda key: key) if arch is None else arch.checkpoint_key  # noqa: E731  (the family's checkpoint names)
    for group in groups.values():
        group["targets"] = [ck(n) for n in group["targets"]]
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in linears)
    ignore += sorted(n for n, m in model.named_modules() if is_experts(m) and n not in linears)
    ignore = [ck(n) for n in ignore]
    formats = {g["format"] for g in groups.values()}
    top = formats.pop() if len(formats) == 1 else "mixed-precision"
    qconfig = {"quant_method": "compressed-tensors", "format": top, "quantization_status": "compressed",
               "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())}, "ignore": ignore,
               "kv_cache_scheme": kv_scheme, "global_compression_ratio": None}
    transforms, held = transform_config(model, ck)
    if transforms is not None:
        qconfig["transform_config"] = transforms
    warn_unstored(model, "compressed-tensors", stores_input=True, stores_kv=kv_scheme is not None,
                  stored_rotations=held)
    out = Path(out_dir)
    check_writable(out / "config.json")
    with torch.no_grad():
        tensors = ((ck(k), v) for k, v in _tensors(model, modules, linears, attention, zero_points))
        write_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
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


def _check_args(w: dict, n: str) -> None:
    """The weights args of a config group are ones this reader takes (types checked: JSON edits are refused)."""
    group = w.get("group_size")
    ok = (type(w.get("num_bits")) is int and 2 <= w["num_bits"] <= 8 and w.get("type", "int") == "int"
          and type(w.get("symmetric")) is bool and w.get("strategy") in _STRATEGY.values()
          and (w["strategy"] != "group" or (type(group) is int and group > 0)))
    if not ok:
        raise ConfigError(f"{n}: weights scheme {w} is not one this reader takes (int, num_bits 2..8, "
                         "strategy tensor / channel / group with a positive group_size)")


def _expect(t: dict, key: str, dtype: torch.dtype | tuple, shape: tuple) -> None:
    if key not in t:
        raise ConfigError(f"tensor {key} is missing")
    v = t[key]
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if v.dtype not in dtypes or tuple(v.shape) != tuple(shape):
        raise ConfigError(f"tensor {key} is {v.dtype} {tuple(v.shape)}; the scheme needs {dtypes[0]} {tuple(shape)}")


def _quantized_weight(t: dict, n: str, w_args: dict, out_f: int, in_f: int) -> QuantizedWeight:
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


def load_compressed_tensors(path: str | os.PathLike) -> nn.Module:
    """Read a pack-quantized checkpoint into a model with QuantizedLinear modules (our loader).

    Raises:
        BadFileError: not a pack-quantized compressed-tensors folder, a scheme that does not fit the stored
            tensors, corrupted or edited files, non-finite values (`qat.export.validate`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    with bad_file(folder, "compressed-tensors export"):
        raw = read_json(folder / "config.json", "model config")
        q = raw.get("quantization_config") or {}
        if not isinstance(q, dict) or q.get("quant_method") != "compressed-tensors" \
                or q.get("format") not in READ_FORMATS:
            raise BadFileError(folder / "config.json", "not a compressed-tensors checkpoint of a format qat reads "
                               f"({', '.join(READ_FORMATS)}; quantization_config={str(raw.get('quantization_config'))[:120]})")
        stored = load_safetensors(folder / "model.safetensors")
        verify_checksums(folder, ("config.json", "model.safetensors"))
        config = AutoConfig.from_pretrained(str(folder))
        config.quantization_config = None
        check_config(config, folder, (folder / "model.safetensors").stat().st_size)
        groups = q.get("config_groups") if isinstance(q.get("config_groups"), dict) else {}
        layers = stored_layers(stored)
        # the exported dtype; the quantized layers' scales (fp32 by default) do not count
        model = AutoModelForCausalLM.from_config(config, dtype=stored_float_dtype(stored, layers))
        arch = find_arch(model)
        hk = (lambda key: key) if arch is None else arch.hf_key  # noqa: E731  (checkpoint names -> transformers 5)
        t = {hk(k): v for k, v in stored.items()}
        # names, regexes and class names ("Linear", as llm-compressor writes them), less `ignore`
        chosen = group_targets(groups, q.get("ignore"), layers, lambda n: module_classes(model, n, hk, EXPERT_PROJ),
                               folder / "config.json")
        targets = [(hk(n), groups[k]["weights"], groups[k].get("format") or q["format"]) for n, k in chosen.items()]
        acts = {hk(n): (groups[k].get("input_activations"), groups[k].get("output_activations"))
                for n, k in chosen.items()}
        unread: dict[str, list[str]] = {}  # reason -> modules whose activation scheme is not re-attached
        experts: dict[str, dict] = {}
        for n, w_args, fmt in targets:
            m = EXPERT_PROJ.match(n)
            if m and is_experts(model.get_submodule(m["experts"])):
                if fmt != "pack-quantized":
                    raise BadFileError(folder / "config.json", f"experts {m['experts']!r} stored as {fmt!r}; "
                                       "experts are read from pack-quantized groups only")
                experts.setdefault(m["experts"], w_args)
                if acts[n][0]:
                    unread.setdefault(f"input_activations {acts[n][0]} of fused experts", []).append(n)
                continue
            old = model.get_submodule(n)
            if not isinstance(old, nn.Linear):
                raise BadFileError(folder / "config.json", f"target {n!r} is not a linear layer of the model")
            qw = (_quantized_weight(t, n, w_args, old.out_features, old.in_features) if fmt == "pack-quantized"
                  else fp_quantized_weight(t, n, w_args, fmt))
            if tuple(qw.shape) != (old.out_features, old.in_features):
                raise ConfigError(f"{n}: the stored weight is {tuple(qw.shape)}; the model's layer is "
                                  f"{(old.out_features, old.in_features)}")
            qw.dtype = old.weight.dtype  # dequantize to the model's dtype (bf16 for a bf16 export)
            inputs, outputs = acts[n]
            i_q = None if not inputs else input_quantizer(inputs, old.in_features, t, n)
            if isinstance(i_q, str):
                unread.setdefault(f"input_activations {inputs} ({i_q})", []).append(n)
                i_q = None
            if outputs:
                unread.setdefault(f"output_activations {outputs}", []).append(n)
            schemes = TensorSchemes(weight=qw.spec, input=None if i_q is None else i_q.spec)
            set_module(model, n, QuantizedLinear(old.in_features, old.out_features, qw, old.bias, i_q, schemes))
        for n, w_args in experts.items():
            set_module(model, n, _load_experts(t, n, model.get_submodule(n), w_args))
        for reason, names in unread.items():
            log.warning("compressed-tensors loader: %s of %d layer(s) (%s) is not re-attached (qat cannot compute "
                        "it); they run on unquantized activations", reason, len(names),
                        ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""))
        if q.get("kv_cache_scheme"):
            _attach_kv(model, t, q["kv_cache_scheme"], folder)
        attach_transforms(model, q.get("transform_config"), folder / "config.json", hk)
        targeted = {n for n, _, _ in targets}
        stray = sorted(k for k in t if ".weight_" in k and k.rsplit(".weight_", 1)[0] not in targeted)
        if stray:
            raise BadFileError(folder, f"packed tensors of layers no config group targets: {stray[:5]}")
        stored_own = {f"{n}.weight" for n in targeted}  # the quantized linears' own tensors (fp8's `<m>.weight`)
        inputs_own = {f"{n}.{key}" for n in targeted for key in INPUT_TENSORS}
        rest = {k: v for k, v in t.items() if ".weight_" not in k and k not in stored_own | inputs_own
                and not k.endswith((".k_scale", ".v_scale"))}
        check_state(model, rest, folder)
        model = load_rest_and_tie(model, rest, folder, config)
    return check_model(model, folder)


def _load_experts(t: dict, name: str, old: nn.Module, w_args: dict) -> QuantizedExperts:
    """QuantizedExperts for the fused experts `old` from the per-expert `<name>.{i}.<proj>` tensors."""
    parts = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
    params = dict(old.named_parameters(recurse=False))
    pieces = {}
    for w, projs in parts.items():
        if w in expert_weight_names(old):
            rows, cols = params[w].shape[1] // len(projs), params[w].shape[2]
            pieces[w] = [[_quantized_weight(t, f"{name}.{e}.{p}", w_args, rows, cols) for p in projs]
                         for e in range(old.num_experts)]
    spec = next(iter(pieces.values()))[0][0].spec
    module = QuantizedExperts.empty(old, TensorSchemes(weight=spec), next(iter(params.values())).dtype)
    for w, per_expert in pieces.items():
        codes = torch.cat([torch.cat([q.codes() for q in projs]) for projs in per_expert])
        qparams = [[q.qparams() for q in projs] for projs in per_expert]
        if spec.granularity == "per_tensor":  # one scale per expert: the [E, O * I] view, per_channel rows
            codes = codes.reshape(old.num_experts, -1)
            scale = torch.stack([qp[0][0].reshape(1) for qp in qparams])
            zp = None if spec.symmetric else torch.stack([qp[0][1].reshape(1) for qp in qparams])
        else:
            scale = torch.cat([qp[0] for projs in qparams for qp in projs])
            zp = None if spec.symmetric else torch.cat([qp[1] for projs in qparams for qp in projs])
        module.qweights[w].set_codes(codes, scale, zp)
    return module
