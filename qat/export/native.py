"""The native format: packed codes, scales and zero-points in safetensors, every scheme in JSON.

A native export is a folder:

    config.json          the Hugging Face model config
    model.safetensors    every tensor of the converted model (`<module>.qweight.packed` uint8,
                         `.qweight.scale`, `.qweight.zero_point` in the layout of the weight's format
                         (`qat.formats`), `.qweight.g_idx`, input-quantizer
                         ranges, float parameters); tied tensors stored once
    qat_quant.json       {"format": "qat-native", "version": 2, "modules": {name: {kind, shape, dtype,
                         schemes: {weight, input}}}, "kv_cache": {...}, "extra_state": {...},
                         "tied": {key: source key}, "rotations": {"input": {module: {size, block}},
                         "kv": {attention: {k_block, v_block, source}}} (only with online rotations)};
                         written last, so its presence marks a complete export

`load_native` rebuilds the model from config.json, swaps in QuantizedLinear / QuantizedEmbedding
(and QuantizedExperts: fused MoE experts, `kind: experts`) modules from the JSON schemes, and loads the tensors (no pickle anywhere). Its forward is the
converted model's forward, bit for bit.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from qat.control import uncalibrated
from qat.errors import BadFileError, ConfigError
from qat.export.common import as_converted, integer_modules, owning_module, stored_float_dtype
from qat.export.publish import folder_writer
from qat.export.validate import bad_file, check_config, check_model, check_state, read_json, verify_checksums
from qat.io import atomic_path, check_writable, load_safetensors, write_json, write_safetensors
from qat.modules.kv_cache import attach_kv_quantizers
from qat.modules.experts import QuantizedExperts, is_experts
from qat.modules.router import QuantizedRouter, is_router
from qat.modules.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedWeight
from qat.modules.quantizer import TensorQuantizer
from qat.modules.rotation import attach_online, online_rotations
from qat.spec import QuantSpec, TensorSchemes
from qat.transform.prepare import set_module

# v2: each weight in its format's storage layout (`qat.formats`: scales in the scheme's dtype, packed integer
# zero-points, GGUF block scales); v1 held float32 scales and zero-points
FORMAT, VERSION, META = "qat-native", 2, "qat_quant.json"
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}


def _spec_dict(spec: QuantSpec | None):
    return None if spec is None else spec.to_dict()


def _module_entry(module: nn.Module) -> dict:
    if isinstance(module, QuantizedExperts):
        dtype = next(iter(module.qweights.values())).dtype
        return {"kind": "experts", "dtype": str(dtype), "weight": _spec_dict(module.schemes.weight),
                "shapes": {n: list(s) for n, s in module.shapes.items() if n in module.qweights}}
    qw = module.qweight
    entry = {"shape": list(qw.shape), "dtype": str(qw.dtype), "weight": _spec_dict(qw.spec)}
    if isinstance(module, QuantizedRouter):
        entry.update(kind="router")
    elif isinstance(module, QuantizedLinear):
        spec_in = module.input_quantizer.spec if module.input_quantizer is not None else None
        entry.update(kind="linear", bias=module.bias is not None, input=_spec_dict(spec_in))
    else:
        entry.update(kind="embedding", padding_idx=module.padding_idx)
    return entry


def _state_items(model: nn.Module, modules: dict[str, nn.Module], entries: dict, extra: dict, tied: dict):
    """(key, tensor) of the converted model's state, in order: each integer module converted alone when
    its first key comes up, its tensors yielded and dropped. Fills `entries` (module descriptions),
    `extra` (non-tensor state) and `tied` (key -> key it shares storage with) on the way."""
    seen, done = {}, set()
    for key, value in model.state_dict().items():
        name = owning_module(key, modules)
        if name is None:
            yield from _checked(key, value, extra, tied, seen)
            continue
        if name in done:
            continue
        done.add(name)
        converted = as_converted(modules[name])
        entries[name] = _module_entry(converted)
        fresh = converted is not modules[name]  # new tensors die after writing: their addresses get reused
        for sub, sub_value in converted.state_dict(prefix=f"{name}.").items():
            yield from _checked(sub, sub_value, extra, tied, None if fresh and (".qweight." in sub or ".qweights." in sub) else seen)


def _checked(key: str, value, extra: dict, tied: dict, seen: dict | None):
    if not isinstance(value, torch.Tensor):
        extra[key] = value
        return
    ident = (value.data_ptr(), tuple(value.shape), value.dtype) if value.numel() and seen is not None else None
    if ident is not None and ident in seen:
        tied[key] = seen[ident]
        return
    if ident is not None:
        seen[ident] = key
    yield key, value


@folder_writer
def save_native(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write a converted or prepared model in the native format, streaming: a prepared model's modules
    are converted one at a time and written as they come (memory: the model plus one module).

    Args:
        model: a Hugging Face model after `qat.prepare` (and training) or `qat.convert`.
        out_dir: the folder to write, complete or not at all (`qat.export.publish.folder_writer`).
        tokenizer: optional; saved beside the weights.
        overwrite: replace an existing export (kept whole until the new one is complete); else refuse it.
    Returns:
        the folder.
    Raises:
        ValueError: the model has no quantized module, static activation / KV quantizers not calibrated yet, or
            the folder is not writable.
    Example:
        >>> save_native(qat.prepare(model, qat.load_recipe("w4a16_g128")), "out/native")
        >>> model2 = load_native("out/native")
    """
    modules = integer_modules(model)
    if not modules:
        raise ConfigError("save_native: the model has no quantized modules; call qat.prepare / qat.convert first")
    missing = uncalibrated(model)
    if missing:  # written, its reload would calibrate them on whatever it evaluates first
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ConfigError(f"save_native: {', '.join(missing[:3])}{more} hold static activation ranges with none yet "
                          "(not calibrated); calibrate the model first (qat.calibrate, qat-ptq, qat-train's "
                          "module.range_init_batches), then export")
    out = Path(out_dir)
    check_writable(out / META)
    entries, extra, tied = {}, {}, {}
    write_safetensors(_state_items(model, modules, entries, extra, tied), out / "model.safetensors",
                      metadata={"format": "pt", "qat": FORMAT})
    attention = {n: m for n, m in model.named_modules() if getattr(m, "k_quantizer", None) is not None}
    kv = None
    if attention:
        kv = {"modules": sorted(attention), "spec": next(iter(attention.values())).k_quantizer.spec.to_dict()}
    meta = {"format": FORMAT, "version": VERSION, "modules": {n: entries[n] for n in modules},
            "kv_cache": kv, "extra_state": extra, "tied": tied}
    online = online_rotations(model)
    if online["input"] or online["kv"]:
        meta["rotations"] = online
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(model.config.to_json_string())
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    write_json(out / META, meta)
    return out


def is_native(path: str | os.PathLike) -> bool:
    """True when `path` is a folder holding a native export."""
    return (Path(path) / META).is_file()


def _read_meta(folder: Path) -> dict:
    meta = read_json(folder / META, "qat export description")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise BadFileError(folder / META, f"format {meta.get('format')!r} v{meta.get('version')}; "
                                          f"this qat reads {FORMAT!r} v{VERSION}")
    for key, kind in (("modules", dict), ("tied", dict), ("extra_state", dict)):
        if not isinstance(meta.get(key), kind):
            raise BadFileError(folder / META, f"{key!r} is not a JSON object")
    return meta


def _build_module(old: nn.Module, entry: dict, name: str) -> nn.Module:
    """The quantized module `entry` describes, in place of `old`; an entry that does not fit `old` is refused."""
    if entry.get("dtype") not in _DTYPES:
        raise ConfigError(f"modules.{name}: dtype {entry.get('dtype')!r} is not one of {sorted(_DTYPES)}")
    dtype = _DTYPES[entry["dtype"]]
    if entry.get("kind") == "experts":
        if not is_experts(old):
            raise ConfigError(f"modules.{name}: 'experts' does not describe the model's {type(old).__name__}")
        schemes = TensorSchemes(weight=QuantSpec.from_dict(entry["weight"], owner=f"{name}.weight"))
        return QuantizedExperts.empty(old, schemes, dtype)
    if entry.get("kind") == "router":
        fits = is_router(old) and entry.get("shape") == list(old.weight.shape)
    else:
        kind = {"linear": nn.Linear, "embedding": nn.Embedding}.get(entry.get("kind"))
        fits = kind is not None and isinstance(old, kind) and entry.get("shape") == list(old.weight.shape) \
            and (kind is not nn.Linear or entry.get("bias") == (old.bias is not None)) \
            and (kind is not nn.Embedding or entry.get("padding_idx") == old.padding_idx)
    if not fits:
        raise ConfigError(f"modules.{name}: {entry.get('kind')!r} {entry.get('shape')} {entry.get('dtype')} does not "
                         f"describe the model's {type(old).__name__} {list(getattr(old, 'weight', torch.empty(0)).shape)}")
    qweight = QuantizedWeight(QuantSpec.from_dict(entry["weight"], owner=f"{name}.weight"), tuple(entry["shape"]), dtype)
    if entry["kind"] == "embedding":
        return QuantizedEmbedding(qweight, entry.get("padding_idx"))
    if entry["kind"] == "router":
        return QuantizedRouter(old, qweight)
    in_features = entry["shape"][1]
    spec_in = None if entry["input"] is None else QuantSpec.from_dict(entry["input"], owner=f"{name}.input")
    input_q = None if spec_in is None else TensorQuantizer(spec_in, "input", torch.zeros(1, in_features))
    bias = old.bias if entry["bias"] else None
    return QuantizedLinear(in_features, entry["shape"][0], qweight, bias, input_q,
                           TensorSchemes(weight=qweight.spec, input=spec_in))


def _attach_rotations(model: nn.Module, record, folder: Path) -> None:
    """The online rotations the export recorded (R3 / R4 / llama.cpp's KV rotation), back on their modules."""
    if record is None:
        return
    if not isinstance(record, dict) or not all(isinstance(record.get(k, {}), dict) for k in ("input", "kv")):
        raise BadFileError(folder / META, "'rotations' is not {input: {...}, kv: {...}}")
    try:
        attach_online(model, record)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise BadFileError(folder / META, f"'rotations' does not fit the model: {err}") from None


def load_native(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a native export as a model with QuantizedLinear / QuantizedEmbedding modules.

    Args:
        path: the export folder.
        dtype: float dtype for the non-quantized parameters (default: the one they were saved in, e.g. bf16
            for a model exported in bf16; float32 when nothing float is stored outside the quantized modules).
    Raises:
        BadFileError: not a native export, a corrupted or edited file, tensors that do not fit the schemes,
            or non-finite values (`qat.export.validate`).
    Example:
        >>> model = load_native("out/native"); logits = model(ids).logits
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    with bad_file(folder, "native export"):
        meta = _read_meta(folder)
        tensors = load_safetensors(folder / "model.safetensors")
        read_json(folder / "config.json", "model config")
        verify_checksums(folder, ("config.json", "model.safetensors", META))
        config = AutoConfig.from_pretrained(str(folder))
        check_config(config, folder, (folder / "model.safetensors").stat().st_size)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or stored_float_dtype(tensors, meta["modules"]))
        if meta.get("kv_cache"):
            kv = meta["kv_cache"]
            attach_kv_quantizers(model, {n: model.get_submodule(n) for n in kv["modules"]}, QuantSpec.from_dict(kv["spec"]))
        for name, entry in meta["modules"].items():
            set_module(model, name, _build_module(model.get_submodule(name), entry, name))
        _attach_rotations(model, meta.get("rotations"), folder)
        state = dict(tensors)
        state.update({k: tensors[v] for k, v in meta["tied"].items()})
        state.update(meta["extra_state"])
        check_state(model, state, folder)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise BadFileError(folder, f"tensors do not match the described model: {err}") from None
    return check_model(model.eval(), folder)
