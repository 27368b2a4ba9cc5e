"""compressed-tensors pack-quantized: our loader and transformers (with compressed-tensors) read our export."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from hypothesis import given, settings
from hypothesis import strategies as st

import qat
from qat.errors import BadFileError
from qat.export import export_compressed_tensors, load_any, load_compressed_tensors
from qat.export.compressed import pack_int32, unpack_int32
from qat.io import load_safetensors, write_safetensors
from qat.testing import tiny_llama
from tests.export.conftest import logits

FP16_SYM = {"name": "w4_fp16", "targets": ["Linear"], "ignore": ["lm_head"],
            "weight": {"bits": 4, "granularity": "per_group", "group_size": 64, "scale_dtype": "fp16"}}


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 6, 8]), rows=st.integers(1, 4), cols=st.integers(1, 80), seed=st.integers(0, 99))
def test_packing_matches_compressed_tensors(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    signed = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (rows, cols), generator=g, dtype=torch.int8)
    ours = pack_int32((signed.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8), bits)
    assert torch.equal(ours, pack_to_int32(signed, bits))
    assert torch.equal(unpack_int32(ours, bits, cols).to(torch.int16) - 2 ** (bits - 1), signed.to(torch.int16))


@pytest.mark.parametrize("recipe", ["w4a16_g128_asym", pytest.param("w4a16_g128", marks=pytest.mark.slow),
                                    pytest.param("w2a16_g64", marks=pytest.mark.slow), pytest.param("fp16_sym", marks=pytest.mark.slow)])
def test_round_trip_through_our_loader(model, ids, tmp_path, recipe):
    r = qat.QuantRecipe.from_dict(FP16_SYM) if recipe == "fp16_sym" else qat.load_recipe(recipe)
    prepared = qat.prepare(model, r)
    ref = logits(prepared, ids)
    export_compressed_tensors(prepared, tmp_path / "ct")
    assert torch.equal(logits(load_compressed_tensors(tmp_path / "ct"), ids), ref)
    assert torch.equal(logits(load_any(tmp_path / "ct"), ids), ref)


@pytest.mark.parametrize("recipe", ["w4a16_g128", "w4a16_g128_asym"])
def test_transformers_loads_our_export_with_equal_logits(model, ids, tmp_path, recipe):
    prepared = qat.prepare(model, qat.load_recipe(recipe))
    ref = logits(prepared, ids)
    export_compressed_tensors(prepared, tmp_path / "ct")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert torch.equal(logits(hf, ids), ref)


def test_asymmetric_zero_points_decode_with_compressed_tensors(model, tmp_path):
    converted = qat.convert(qat.prepare(model, qat.load_recipe("w4a16_g128_asym")))
    export_compressed_tensors(converted, tmp_path / "ct")
    t = load_safetensors(tmp_path / "ct" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    qw = converted.get_submodule(name).qweight
    shape = (qw.shape[0], qw.shape[1] // 128)
    zp = unpack_from_int32(t[f"{name}.weight_zero_point"], 4, torch.Size(shape), packed_dim=0)
    assert torch.equal(zp.float() + 8, qw.qparams()[1].reshape(shape))  # the held zero-points (stored packed)
    w = unpack_from_int32(t[f"{name}.weight_packed"], 4, torch.Size(qw.shape)).float()
    deq = ((w - zp.float().repeat_interleave(128, 1)) * t[f"{name}.weight_scale"].repeat_interleave(128, 1))
    assert torch.equal(deq, qw.dequantize())


def test_zero_point_layouts_hold_compressed_tensors_packing(model, ids, tmp_path):
    """"packed" is compressed-tensors' compressor's own tensor (pack_to_int32 along dim 0), "padded" the same
    words followed by zero rows up to [out, groups]; qat's loader reads both to the model's logits."""
    converted = qat.convert(qat.prepare(model, qat.load_recipe("w4a16_g128_asym")))
    ref = logits(converted, ids)
    name = "model.layers.0.self_attn.q_proj"
    qw = converted.get_submodule(name).qweight
    signed_zp = (qw.qparams()[1].reshape(qw.shape[0], -1) - 8).to(torch.int8)
    theirs = pack_to_int32(signed_zp, 4, packed_dim=0)
    for layout in ("packed", "padded"):
        export_compressed_tensors(converted, tmp_path / layout, zero_points=layout)
        zp = load_safetensors(tmp_path / layout / "model.safetensors")[f"{name}.weight_zero_point"]
        assert torch.equal(zp[: theirs.shape[0]], theirs)
        assert zp.shape == (theirs.shape if layout == "packed" else (qw.shape[0], theirs.shape[1]))
        assert torch.equal(logits(load_compressed_tensors(tmp_path / layout), ids), ref)
    with pytest.raises(ValueError, match="zero_points='dense'; choose from"):
        export_compressed_tensors(converted, tmp_path / "x", zero_points="dense")


def test_unsupported_scheme_is_named(model, tmp_path):
    prepared = qat.prepare(model, qat.load_recipe("gguf_q4_0"))
    with pytest.raises(ValueError, match="model.layers.0.*supported: int weights"):
        export_compressed_tensors(prepared, tmp_path / "ct")


def ragged_model():
    """A Llama whose q/k/v/o/gate/up rows are 96 wide: g64 gives ceil(96/64) = 2 groups, the last of 32."""
    return tiny_llama(vocab_size=128, hidden_size=96, intermediate_size=192, num_layers=1, max_position_embeddings=64)


def ragged_recipe(sym: bool = True):
    return qat.QuantRecipe.from_dict({"name": "rg", "targets": ["Linear"], "ignore": ["lm_head"], "weight": {
        "bits": 4, "symmetric": sym, "granularity": "per_group", "group_size": 64, "ragged": True, "scale_dtype": "fp16"}})


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_ragged_groups_round_trip(tmp_path, sym):
    prepared = qat.prepare(ragged_model(), ragged_recipe(sym))
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    ref = logits(prepared, ids)
    export_compressed_tensors(prepared, tmp_path / "ct")
    t = load_safetensors(tmp_path / "ct" / "model.safetensors")
    assert t["model.layers.0.self_attn.q_proj.weight_scale"].shape == (96, 2)  # [O, ceil(I/g)]
    assert t["model.layers.0.mlp.down_proj.weight_scale"].shape == (96, 3)
    if not sym:  # "padded": [out, groups], the packed words in the first out * 4 / 32 rows
        zp = t["model.layers.0.self_attn.q_proj.weight_zero_point"]
        assert zp.shape == (96, 2) and not zp[96 * 4 // 32:].any()
    assert torch.equal(logits(load_compressed_tensors(tmp_path / "ct"), ids), ref)


def test_overlapping_groups_as_llm_compressor_writes_them_resolve_as_compressed_tensors(model, ids, tmp_path):
    """`targets: [Linear]` in one group, `re:.*down_proj` in another (a mixed recipe as llm-compressor writes it): each
    down_proj takes the regex's group (int8), every other linear the class's (int4), in qat and in transformers."""
    mixed = qat.QuantRecipe.from_dict({**qat.load_recipe("w4a16_g128").to_dict(),
                                       "overrides": [{"targets": ["re:.*down_proj"], "weight": {"bits": 8}}]})
    prepared = qat.prepare(model, mixed)
    ref = logits(prepared, ids)
    out = export_compressed_tensors(prepared, tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    assert len(groups) == 2
    for group in groups.values():
        group["targets"] = ["re:.*down_proj"] if group["weights"]["num_bits"] == 8 else ["Linear"]
    config["quantization_config"]["ignore"] = ["lm_head"]
    (out / "config.json").write_text(json.dumps(config))
    (out / "qat_checksums.json").unlink()  # as another tool would have written it
    loaded = load_compressed_tensors(out)
    assert loaded.model.layers[0].mlp.down_proj.qweight.spec.bits == 8
    assert loaded.model.layers[0].mlp.up_proj.qweight.spec.bits == 4
    assert torch.equal(logits(loaded, ids), ref)
    assert torch.equal(logits(transformers.AutoModelForCausalLM.from_pretrained(out), ids), ref)
    groups["group_1" if groups["group_1"]["weights"]["num_bits"] == 8 else "group_0"]["weights"] = None
    (out / "config.json").write_text(json.dumps(config))  # the down_proj group, activations only: not this file
    with pytest.raises(BadFileError, match=r"layer 'model.layers.0.mlp.down_proj' holds quantized weights, but "
                                           r"config group 'group_.', whose scheme it takes .*has no weights"):
        load_compressed_tensors(out)


def test_fp8_dynamic_is_float_quantized_and_reloads_exactly(model, ids, tmp_path):
    """fp8_dynamic (e4m3 per-channel weights, dynamic per-token e4m3 activations) is compressed-tensors' FP8_DYNAMIC
    preset in format float-quantized: qat's loader and transformers + compressed-tensors (fp32) both give the
    fake-quant logits, activations included (atol=0)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    prepared = qat.prepare(model, qat.load_recipe("fp8_dynamic"))
    ref = logits(prepared, ids)
    out = export_compressed_tensors(prepared, tmp_path / "ct")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    group = next(iter(q["config_groups"].values()))
    assert q["format"] == group["format"] == "float-quantized" and len(q["config_groups"]) == 1
    for key in ("weights", "input_activations"):  # the preset leaves the observer to the tool that calibrates
        ours = QuantizationArgs(**group[key]).model_copy(update={"observer": None})
        assert ours == PRESET_SCHEMES["FP8_DYNAMIC"][key], key
    t = load_safetensors(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    assert t[f"{name}.weight"].dtype == torch.float8_e4m3fn and t[f"{name}.weight_scale"].shape == (256, 1)
    loaded = load_compressed_tensors(out)
    assert loaded.get_submodule(name).input_quantizer.spec == prepared.get_submodule(name).input_quantizer.spec
    assert torch.equal(logits(loaded, ids), ref)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(logits(hf, ids), ref)


def test_fp8_per_tensor_weights_with_bf16_scales_round_trip(model, ids, tmp_path):
    recipe = {"name": "fp8_w", "targets": ["Linear"], "ignore": ["lm_head"],
              "weight": {"bits": 8, "dtype": "fp8_e4m3", "granularity": "per_tensor", "scale_dtype": "bf16"}}
    prepared = qat.prepare(model, qat.QuantRecipe.from_dict(recipe))
    ref = logits(prepared, ids)
    out = export_compressed_tensors(prepared, tmp_path / "ct")
    scale = load_safetensors(out / "model.safetensors")["model.layers.1.self_attn.k_proj.weight_scale"]
    assert scale.dtype == torch.bfloat16 and scale.shape == (1,)
    loaded = load_compressed_tensors(out)
    assert loaded.model.layers[1].self_attn.k_proj.qweight.spec == prepared.model.layers[1].self_attn.k_proj.weight_quantizer.spec
    assert torch.equal(logits(loaded, ids), ref)


@pytest.mark.parametrize("weight", [{"dtype": "fp8_e5m2", "granularity": "per_channel"},
                                    {"dtype": "fp8_e4m3", "granularity": "per_channel", "axis": 1}], ids=["e5m2", "axis1"])
def test_fp8_weights_it_cannot_hold_are_refused_naming_the_module(model, tmp_path, weight):
    recipe = {"name": "fp8_w", "targets": ["Linear"], "ignore": ["lm_head"], "weight": {"bits": 8, **weight}}
    prepared = qat.prepare(model, qat.QuantRecipe.from_dict(recipe))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj .*fp8_e4m3 per_channel \(axis 0\)"):
        export_compressed_tensors(prepared, tmp_path / "ct")
    assert not (tmp_path / "ct" / "config.json").exists()


@pytest.mark.parametrize("edit, match", [
    (lambda t, k: t.update({f"{k}.weight": t[f"{k}.weight"][:, :64].contiguous()}), r"stored weight is \(512, 64\)"),
    (lambda t, k: t.update({f"{k}.weight_scale": torch.ones(3)}), r"weight_scale is .*needs a float \(512, 1\)"),
    (lambda t, k: t.update({f"{k}.weight": t[f"{k}.weight"].float()}), r"qat reads num_bits 8, type float")],
    ids=["weight_shape", "scale_shape", "weight_dtype"])
def test_edited_fp8_tensors_are_refused_naming_the_layer(model, tmp_path, edit, match):
    out = export_compressed_tensors(qat.prepare(model, qat.load_recipe("fp8_dynamic")), tmp_path / "ct")
    t = load_safetensors(out / "model.safetensors")
    edit(t, "model.layers.0.mlp.gate_proj")
    write_safetensors(t.items(), out / "model.safetensors")
    (out / "qat_checksums.json").unlink()  # as another tool would have written it
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.*" + match):
        load_compressed_tensors(out)


@pytest.mark.parametrize("recipe, packed", [("w4a16_g128", r"is torch.int32 \(512, 28\); the scheme needs torch.int32 "
                                                           r"\(512, 32\)"),
                                            ("mxfp4", r"the stored weight is \(512, 124\) \(torch.uint8\); "
                                                      r"mxfp4-pack-quantized needs \(512, 128\)"),
                                            ("nvfp4_w4a16", r"the stored weight is \(512, 124\) \(torch.uint8\); "
                                                            r"nvfp4-pack-quantized needs \(512, 128\)")],
                         ids=["int", "mxfp4", "nvfp4"])
def test_truncated_weight_packed_is_named_not_its_scale(model, tmp_path, recipe, packed):
    """A weight_packed cut short (a corrupted export) was blamed on weight_scale, whose expected shape NVFP4's reader
    derived from the truncated codes: the message names the tensor, the file, the shape found and the one expected."""
    out = export_compressed_tensors(qat.prepare(model, qat.load_recipe(recipe)), tmp_path / "ct")
    t = load_safetensors(out / "model.safetensors")
    key = "model.layers.0.mlp.gate_proj.weight_packed"
    t[key] = t[key][:, :-4].contiguous()
    write_safetensors(t.items(), out / "model.safetensors")
    (out / "qat_checksums.json").unlink()  # as another tool would have written it
    with pytest.raises(BadFileError, match=rf"tensor {key} in model.safetensors[: ].*{packed}") as err:
        load_compressed_tensors(out)
    assert "weight_scale" not in str(err.value)


@pytest.mark.parametrize("where, message", [
    ("top", r"config.json: quantization_config.format='nvfp5-pack-quantized'; qat reads \['pack-quantized', "
            r"'mxfp4-pack-quantized', 'nvfp4-pack-quantized', 'mxfp8-quantized', 'float-quantized', 'mixed-precision'\]$"),
    ("group", r"config.json: quantization_config.config_groups.group_0.format='nvfp5-pack-quantized' \(checkpoint "
              r"format 'pack-quantized'\); qat reads \['pack-quantized', .*'float-quantized'\]$")], ids=["top", "group"])
def test_unknown_format_name_is_one_line_naming_the_key(model, tmp_path, where, message):
    """An unknown format in config.json dumped the quantization_config, cut off at 120 characters (the format not
    always in what was left): the message is the key, the value and the formats qat reads."""
    out = export_compressed_tensors(qat.prepare(model, qat.load_recipe("w4a16_g128")), tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    (q if where == "top" else q["config_groups"]["group_0"])["format"] = "nvfp5-pack-quantized"
    (out / "config.json").write_text(json.dumps(config))
    (out / "qat_checksums.json").unlink()
    with pytest.raises(BadFileError, match=message) as err:
        load_compressed_tensors(out)
    assert "config_groups': " not in str(err.value) and "\n" not in str(err.value)
