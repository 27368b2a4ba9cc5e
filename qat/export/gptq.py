"""GPTQ checkpoint writer and reader (the layout GPTQModel, transformers' GPTQ integration and vLLM read).

Per quantized linear `<m>` with weight [out, in], bits b in {2, 4, 8}, groups of g along `in`:
    <m>.qweight  int32 [in * b / 32, out]  unsigned codes u, packed along `in`, LSB first (code k of a
                                           word at bits [k*b, k*b + b))
    <m>.qzeros   int32 [ceil(in / g), out * b / 32]  zero-points packed along `out`, stored as zero - 1
                                           (the v1 "gptq" convention, checkpoint_format: gptq)
    <m>.scales   float16 [ceil(in / g), out]
    <m>.g_idx    int32 [in]                group of each input column: i // g, or the act-order one (desc_act)
and quantize_config.json (also in config.json as quantization_config):
    {bits, group_size, desc_act, sym, damp_percent, static_groups, true_sequential, quant_method: gptq,
     checkpoint_format: gptq}.
Weight w = (u - (qzeros + 1)) * scale. Our symmetric signed codes q are stored as u = q + 2^(b-1) with
zero 2^(b-1) (qzeros holds 2^(b-1) - 1). v1 cannot hold an asymmetric zero-point of 0 (it would be
stored as -1 and wrap): such a weight is refused. Scales are stored in fp16: a scheme with
scale_dtype fp16 round-trips exactly, others are rounded (a warning says so).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from qat.errors import BadFileError, ConfigError
from qat.export.common import (integer_kind, integer_modules, load_rest_and_tie, owning_module,
                               quantizer_prefixes, stored_float_dtype, warn_unstored, weight_of, weight_spec)
from qat.export.compressed_int import pack_int32, unpack_int32
from qat.export.publish import folder_writer
from qat.export.validate import bad_file, check_config, check_model, check_state, read_json, verify_checksums
from qat.formats import get_format
from qat.io import atomic_path, check_writable, load_safetensors, write_json, write_safetensors
from qat.modules.quantized import QuantizedLinear, QuantizedWeight
from qat.spec import QuantSpec, TensorSchemes
from qat.transform.prepare import set_module

log = logging.getLogger(__name__)
GPTQ_BITS = (2, 4, 8)


def _check(name: str, spec: QuantSpec) -> int:
    problems = []
    if "gptq" not in get_format(spec).holds or spec.bits not in GPTQ_BITS:
        problems.append(f"int bits in {list(GPTQ_BITS)}")
    if spec.granularity not in ("per_group", "per_channel") or (spec.granularity == "per_channel" and spec.axis != 0):
        problems.append("per_group, or per_channel on axis 0")
    if problems:
        raise ConfigError(f"GPTQ export: {name} has {spec.describe()}; GPTQ needs {' and '.join(problems)}")
    return spec.group_size if spec.granularity == "per_group" else -1


def check_schemes(schemes: TensorSchemes, name: str) -> None:
    """Refuse a module's weight scheme GPTQ cannot hold (the writer's own check), before anything loads.

    Raises:
        ConfigError: naming `name` (a module, or a recipe's key) and what GPTQ needs.
    """
    if schemes.weight is not None:
        _check(name, schemes.weight)


def _gptq_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    spec, (out_f, in_f) = qw.spec, qw.shape
    half = 2 ** (spec.bits - 1)
    codes = qw.codes().to(torch.int16)
    u = codes + half if spec.signed else codes
    scale, zp = qw.qparams()
    n_groups = scale.reshape(out_f, -1).shape[1]
    zero = torch.full((out_f, n_groups), half, dtype=torch.int16) if zp is None else zp.reshape(out_f, -1).to(torch.int16)
    if bool((zero == 0).any()):
        raise ConfigError(f"GPTQ export: {name} has a zero-point of 0, which the v1 format (stores zero - 1) cannot hold")
    g = spec.group_size if spec.granularity == "per_group" else in_f
    g_idx = qw.group_index() if qw.group_index() is not None else torch.arange(in_f) // g
    return {f"{name}.qweight": pack_int32(u.to(torch.uint8), spec.bits).t().contiguous(),
            f"{name}.qzeros": pack_int32((zero - 1).t().to(torch.uint8), spec.bits),
            f"{name}.scales": scale.reshape(out_f, -1).t().to(torch.float16).contiguous(),
            f"{name}.g_idx": g_idx.to(torch.int32)}


def _plan(model: nn.Module) -> tuple[dict, dict]:
    """(quantized linears, quantize_config), every scheme checked before anything is written."""
    modules = integer_modules(model)
    linears = {n: m for n, m in modules.items() if integer_kind(m) is QuantizedLinear}
    if not linears:
        raise ConfigError("GPTQ export: the model has no quantized linear layers")
    if len(linears) < len(modules):
        raise ConfigError("GPTQ export: quantized embeddings have no GPTQ layout; quantize linears only")
    specs = {n: weight_spec(model, f"{n}.weight") for n in linears}
    groups = {n: _check(n, spec) for n, (spec, _) in specs.items()}
    kinds = {(spec.bits, groups[n], spec.symmetric) for n, (spec, _) in specs.items()}
    if len(kinds) > 1:
        raise ConfigError(f"GPTQ export: one (bits, group_size, sym) for all layers; found {sorted(kinds)}")
    bits, group_size, sym = kinds.pop()
    rounded = sorted(n for n, (spec, _) in specs.items() if spec.scale_dtype != "fp16")
    if rounded:
        log.warning("GPTQ export: %d layer(s) have %s scales; stored as fp16 (rounded): %s", len(rounded),
                    specs[rounded[0]][0].scale_dtype, ", ".join(rounded[:3]) + (", ..." if len(rounded) > 3 else ""))
    desc_act = any(actorder for _, actorder in specs.values())
    qconfig = {"bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym, "damp_percent": 0.01,
               "static_groups": False, "true_sequential": True, "quant_method": "gptq", "checkpoint_format": "gptq",
               "model_file_base_name": "model", "modules": sorted(linears)}
    return linears, qconfig


def _tensors(model: nn.Module, linears: dict):
    """(name, tensor) of the checkpoint, one linear quantized and packed at a time, then the rest."""
    for n, m in linears.items():
        yield from _gptq_tensors(n, weight_of(model, f"{n}.weight")).items()
        if m.bias is not None:
            yield f"{n}.bias", m.bias.detach()
    tied = getattr(model.config, "tie_word_embeddings", False)
    quantizers = quantizer_prefixes(model)  # GPTQ has no place for activation or KV-cache state (warn_unstored)
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and owning_module(key, linears) is None and not key.startswith(quantizers) \
                and not (tied and key == "lm_head.weight"):
            yield key, value


@folder_writer
def export_gptq(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write a (prepared or converted) model's quantized linears as a GPTQ v1 checkpoint, streaming:
    each linear is quantized, packed and written in turn (memory: the model plus one tensor's worth).

    All quantized linears must share bits, group size and symmetry (GPTQ has one config).
    Raises:
        ValueError: a scheme GPTQ cannot hold (named), mixed schemes, or no quantized linear.
    Example:
        >>> export_gptq(qat.prepare(model, qat.load_recipe("w4a16_g128")), "out/gptq")
    """
    linears, qconfig = _plan(model)
    warn_unstored(model, "GPTQ", stores_input=False)
    out = Path(out_dir)
    check_writable(out / "config.json")
    with torch.no_grad():
        write_safetensors(_tensors(model, linears), out / "model.safetensors", metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    write_json(out / "quantize_config.json", qconfig)
    config = model.config.to_dict()
    config["quantization_config"] = {k: v for k, v in qconfig.items() if k != "modules"}
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, default=str))
    return out


def _check_config(q: dict) -> None:
    g = q.get("group_size")
    if q.get("bits") not in GPTQ_BITS or type(q.get("bits")) is not int or type(q.get("sym")) is not bool \
            or type(g) is not int or not (g == -1 or g > 0):
        raise ConfigError(f"bits={q.get('bits')!r}, sym={q.get('sym')!r}, group_size={g!r}: this reader takes bits in "
                         f"{list(GPTQ_BITS)}, sym true / false and group_size -1 or > 0")


def _expect(t: dict, key: str, dtype: torch.dtype, shape: tuple) -> None:
    if key not in t:
        raise ConfigError(f"tensor {key} is missing")
    if t[key].dtype != dtype or tuple(t[key].shape) != tuple(shape):
        raise ConfigError(f"tensor {key} is {t[key].dtype} {tuple(t[key].shape)}; the config needs {dtype} {tuple(shape)}")


def _read_linear(t: dict, n: str, q: dict, out_f: int, in_f: int) -> QuantizedWeight:
    bits, sym = q["bits"], q["sym"]
    groups = 1 if q["group_size"] == -1 else -(-in_f // q["group_size"])
    _expect(t, f"{n}.qweight", torch.int32, (-(-in_f * bits // 32), out_f))
    _expect(t, f"{n}.qzeros", torch.int32, (groups, -(-out_f * bits // 32)))
    _expect(t, f"{n}.scales", torch.float16, (groups, out_f))
    _expect(t, f"{n}.g_idx", torch.int32, (in_f,))
    qweight, scales = t[f"{n}.qweight"], t[f"{n}.scales"]
    u = unpack_int32(qweight.t().contiguous(), bits, in_f).to(torch.int16)
    zero = unpack_int32(t[f"{n}.qzeros"], bits, out_f).to(torch.int16).t() + 1
    g = q["group_size"] if q["group_size"] != -1 else in_f
    gran = {"granularity": "per_channel"}
    if q["group_size"] != -1:  # ceil(in / g) groups; the last one shorter when g does not divide in
        gran = {"granularity": "per_group", "group_size": g, "ragged": bool(in_f % g)}
    spec = QuantSpec(bits=bits, symmetric=sym, scale_dtype="fp16", **gran)
    scale = scales.t().float().reshape((out_f, -1, 1) if spec.granularity == "per_group" else (out_f, 1))
    qw = QuantizedWeight(spec, (out_f, in_f))
    g_idx = t[f"{n}.g_idx"].to(torch.int64)
    if spec.granularity == "per_group" and not torch.equal(g_idx, torch.arange(in_f) // g):
        qw.g_idx = g_idx
    if sym:
        qw.set_codes((u - 2 ** (bits - 1)).to(torch.int8), scale, None)
    else:
        qw.set_codes(u.to(torch.uint8), scale, zero.float().reshape(scale.shape))
    return qw


def load_gptq(path: str | os.PathLike) -> nn.Module:
    """Read a GPTQ v1 checkpoint (as written by `export_gptq`) into QuantizedLinear modules.

    Raises:
        BadFileError: not a GPTQ folder, a v2 / unknown checkpoint_format, tensors that do not fit the config,
            corrupted or edited files, non-finite values (`qat.export.validate`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    with bad_file(folder, "GPTQ export"):
        q = read_json(folder / "quantize_config.json", "GPTQ quantize_config.json")
        if q.get("checkpoint_format", "gptq") != "gptq":
            raise BadFileError(folder / "quantize_config.json", f"checkpoint_format={q.get('checkpoint_format')!r}; "
                               "this reader takes 'gptq' (v1)")
        try:
            _check_config(q)
        except ValueError as err:
            raise BadFileError(folder / "quantize_config.json", str(err)) from None
        t = load_safetensors(folder / "model.safetensors")
        read_json(folder / "config.json", "model config")
        verify_checksums(folder, ("config.json", "model.safetensors", "quantize_config.json"))
        config = AutoConfig.from_pretrained(str(folder))
        config.quantization_config = None
        check_config(config, folder, (folder / "model.safetensors").stat().st_size)
        names = sorted({k.rsplit(".", 1)[0] for k in t if k.endswith(".qweight")})
        model = AutoModelForCausalLM.from_config(config, dtype=stored_float_dtype(t, names))  # the exported dtype
        if "modules" in q and q["modules"] != names:
            raise BadFileError(folder, f"the packed layers {names[:3]}... are not the modules quantize_config.json lists")
        for n in names:
            old = model.get_submodule(n)
            if not isinstance(old, nn.Linear):
                raise BadFileError(folder, f"{n!r} holds a qweight but is not a linear layer of the model")
            qw = _read_linear(t, n, q, old.out_features, old.in_features)
            qw.dtype = old.weight.dtype  # dequantize to the model's dtype (bf16 for a bf16 export)
            set_module(model, n, QuantizedLinear(old.in_features, old.out_features, qw, old.bias, None,
                                                 TensorSchemes(weight=qw.spec)))
        packed = {f"{n}.{part}" for n in names for part in ("qweight", "qzeros", "scales", "g_idx")}
        rest = {k: v for k, v in t.items() if k not in packed}
        check_state(model, rest, folder)
        model = load_rest_and_tie(model, rest, folder, config)
    return check_model(model, folder)
