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
`.v_scale` [1], as compressed-tensors names them (`qat.export.ct_kv_cache`); other KV schemes (per-token dynamic)
have no place and are warned about.
Dynamic input schemes (and NVFP4's static global: `<m>.input_global_scale`) are each group's `input_activations`,
re-attached by the loader (`qat.export.ct_activations`).
Online rotations (R3, R4, llama.cpp's KV rotation) of power-of-two sizes go to `transform_config`
(`qat.export.ct_transforms`, read back by the loader); others are warned about.
Fused MoE experts (`QuantizedExperts`, transformers' `mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj`) are written
in the per-expert layout vLLM and llm-compressor use: `<experts>.{i}.gate_proj` / `.up_proj` (the two row halves of
gate_up_proj) / `.down_proj`, each a linear as above (a per_tensor scheme: one scale per expert and projection;
`qat.export.ct_experts`).
Our unsigned asymmetric codes u with zero-point z are stored as u - 2^(bits-1), z - 2^(bits-1): the same
(u - z) * scale. Quantized embeddings are stored dequantized (compressed-tensors packs linears only).
The bit packing is `qat.packing.pack` row by row (same bit order), viewed as little-endian int32; one int linear's
tensors are written and read by `qat.export.compressed_int`.
Linears in a float format (fp8 e4m3 per channel / tensor, MXFP4, NVFP4, MXFP8, FP8 blocks) go to
`qat.export.compressed_fp` (its own layout and config-group format); a checkpoint with both kinds of groups has
format "mixed-precision". This module plans the config groups, streams the checkpoint and loads it back.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.arch import find_arch
from qat.errors import BadFileError, ConfigError
from qat.export.compressed_fp import (fp_format, fp_linear_tensors, fp_quantized_weight, fp_weights_args,
                                     input_global_tensors)
from qat.export.compressed_int import (ZERO_POINT_LAYOUTS, check_int_spec, int_linear_tensors, int_quantized_weight,
                                       int_weights_args, pack_int32, unpack_int32)
from qat.export.ct_activations import INPUT_TENSORS, input_args, input_quantizer, input_spec
from qat.export.ct_experts import (EXPERT_PROJ, EXPERT_WEIGHTS, check_expert_spec, expert_linears, load_experts,
                                  weight_names)
from qat.export.ct_kv_cache import KV_TENSORS, attach_kv, kv_scheme, kv_tensors
from qat.export.ct_targets import group_targets, module_classes, stored_layers
from qat.export.ct_transforms import attach_transforms, transform_config
from qat.export.common import (integer_kind, integer_modules, load_rest_and_tie, owning_module,
                               quantizer_prefixes, stored_float_dtype, warn_unstored, weight_of, weight_spec)
from qat.export.publish import folder_writer
from qat.export.validate import bad_file, check_config, check_model, check_state, read_json, verify_checksums
from qat.formats import get_format
from qat.io import atomic_path, check_writable, load_safetensors, write_safetensors
from qat.modules.experts import QuantizedExperts, is_experts
from qat.modules.quantized import QuantizedLinear
from qat.spec import QuantSpec, TensorSchemes
from qat.transform.prepare import set_module

# names of the layout modules that callers have imported from here since before the split
__all__ = ["READ_FORMATS", "MX_INPUTS", "ZERO_POINT_LAYOUTS", "EXPERT_PROJ", "EXPERT_WEIGHTS", "check_schemes",
           "export_compressed_tensors", "load_compressed_tensors", "expert_linears", "pack_int32", "unpack_int32"]

log = logging.getLogger(__name__)
READ_FORMATS = ("pack-quantized", "mxfp4-pack-quantized", "nvfp4-pack-quantized", "mxfp8-quantized", "float-quantized",
                "mixed-precision")
MX_INPUTS = ("mxfp4", "mxfp8")  # dynamic activations written as compressed-tensors' scheme, scaled otherwise there


def check_schemes(schemes: TensorSchemes, name: str, experts: bool = False) -> None:
    """Refuse a module's schemes this format cannot hold (the writer's own per-module checks), so that a job can
    refuse a recipe before it loads or quantizes anything; `experts`: the schemes reach fused MoE experts.

    Raises:
        ConfigError: a weight scheme that is neither int nor a microscaling float format (for experts: not int),
            or a static input scheme, naming `name` (a module, or a recipe's key).
    """
    if schemes.weight is not None and experts:
        check_expert_spec(name, schemes.weight)
    elif schemes.weight is not None and fp_format(schemes.weight) is None:
        check_int_spec(name, schemes.weight)
    input_args(schemes.input, name)


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
        check_expert_spec(n, spec)
        w_args = int_weights_args(spec, False)
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
            check_int_spec(n, spec)
        if spec.granularity == "per_group" and m.in_features % spec.group_size:
            ragged.append(n)
        w_args = fp_weights_args(spec) if fmt else int_weights_args(spec, actorder)
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
    yield from kv_tensors(attention)
    for n, m in linears.items():
        if integer_kind(m) is QuantizedExperts:  # each expert weight quantized once, written expert by expert
            held = {w: weight_of(model, f"{n}.{w}") for w in weight_names(m)}
            for sub, piece in expert_linears(n, m, held.__getitem__).items():
                yield from int_linear_tensors(sub, piece, zero_points).items()
            for key, value in m.named_parameters():  # expert biases (none in the supported families)
                if key not in held and not key.startswith("weight_quantizers."):
                    yield f"{n}.{key}", value.detach()
            continue
        qw = weight_of(model, f"{n}.weight")
        yield from (fp_linear_tensors(n, qw) if fp_format(qw.spec) else int_linear_tensors(n, qw, zero_points)).items()
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
    kv_args, attention = kv_scheme(model)
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
               "kv_cache_scheme": kv_args, "global_compression_ratio": None}
    transforms, held = transform_config(model, ck)
    if transforms is not None:
        qconfig["transform_config"] = transforms
    warn_unstored(model, "compressed-tensors", stores_input=True, stores_kv=kv_args is not None,
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


def _check_formats(q: Any, where: Path) -> None:
    """quantization_config is compressed-tensors' with a format qat reads, its config groups' formats too: a bad one
    is named by its key, with the valid names (one line, not the config dumped)."""
    if not isinstance(q, dict):
        raise BadFileError(where, f"quantization_config is a {type(q).__name__}; a compressed-tensors checkpoint "
                           "holds a mapping with quant_method 'compressed-tensors'")
    if q.get("quant_method") != "compressed-tensors":
        raise BadFileError(where, f"quantization_config.quant_method={q.get('quant_method')!r}; this reader takes "
                           "'compressed-tensors'")
    if q.get("format") not in READ_FORMATS:
        raise BadFileError(where, f"quantization_config.format={q.get('format')!r}; qat reads {list(READ_FORMATS)}")


def _group_format(q: dict, key: str, where: Path) -> str:
    """The layout of config group `key`'s layers: its own `format`, else the checkpoint's (one of READ_FORMATS but
    mixed-precision, which says each group names its own); a bad one named by its key, with the valid names."""
    fmt = q["config_groups"][key].get("format") or q["format"]
    layouts = [f for f in READ_FORMATS if f != "mixed-precision"]
    if fmt not in layouts:
        raise BadFileError(where, f"quantization_config.config_groups.{key}.format="
                           f"{q['config_groups'][key].get('format')!r} (checkpoint format {q['format']!r}); qat reads "
                           f"{layouts}")
    return fmt


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
        _check_formats(q, folder / "config.json")
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
        for n, k in chosen.items():
            if not isinstance(groups[k].get("weights"), dict):
                raise BadFileError(folder / "config.json", f"layer {n!r} holds quantized weights, but config group "
                                   f"{k!r}, whose scheme it takes (compressed-tensors' precedence), has no weights")
        targets = [(hk(n), groups[k]["weights"], _group_format(q, k, folder / "config.json"))
                   for n, k in chosen.items()]
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
                if experts.setdefault(m["experts"], w_args) != w_args:  # one QuantizedExperts, one weight scheme
                    raise BadFileError(folder / "config.json", f"the pieces of experts {m['experts']!r} take config "
                                       f"groups with different weights ({experts[m['experts']]}, {w_args}); qat reads "
                                       "fused experts under one weights scheme")
                if acts[n][0]:
                    unread.setdefault(f"input_activations {acts[n][0]} of fused experts", []).append(n)
                continue
            old = model.get_submodule(n)
            if not isinstance(old, nn.Linear):
                raise BadFileError(folder / "config.json", f"target {n!r} is not a linear layer of the model")
            qw = (int_quantized_weight(t, n, w_args, old.out_features, old.in_features) if fmt == "pack-quantized"
                  else fp_quantized_weight(t, n, w_args, fmt, old.out_features, old.in_features))
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
            set_module(model, n, load_experts(t, n, model.get_submodule(n), w_args))
        for reason, names in unread.items():
            log.warning("compressed-tensors loader: %s of %d layer(s) (%s) is not re-attached (qat cannot compute "
                        "it); they run on unquantized activations", reason, len(names),
                        ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""))
        if q.get("kv_cache_scheme"):
            attach_kv(model, t, q["kv_cache_scheme"], folder)
        attach_transforms(model, q.get("transform_config"), folder / "config.json", hk)
        targeted = {n for n, _, _ in targets}
        stray = sorted(k for k in t if ".weight_" in k and k.rsplit(".weight_", 1)[0] not in targeted)
        if stray:
            raise BadFileError(folder, f"packed tensors of layers no config group targets: {stray[:5]}")
        stored_own = {f"{n}.weight" for n in targeted}  # the quantized linears' own tensors (fp8's `<m>.weight`)
        inputs_own = {f"{n}.{key}" for n in targeted for key in INPUT_TENSORS}
        rest = {k: v for k, v in t.items() if ".weight_" not in k and k not in stored_own | inputs_own
                and not k.endswith(KV_TENSORS)}
        check_state(model, rest, folder)
        model = load_rest_and_tie(model, rest, folder, config)
    return check_model(model, folder)
