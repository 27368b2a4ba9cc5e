"""qat's compressed-tensors loader re-attaches the input-activation quantization a config group's
`input_activations` describes (qat.export.ct_activations): the reload computes what the exported fake-quant model
did; what it cannot re-attach is warned about, naming the modules."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import qat
from qat.errors import BadFileError
from qat.export import export, load_any
from qat.export.ct_activations import input_args, input_spec
from qat.io import load_safetensors, write_safetensors
from qat.testing import tiny_llama

IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
INT8 = {"bits": 8, "granularity": "per_token", "dynamic": True}


def _model(recipe):
    return qat.prepare(tiny_llama(), qat.transform.as_recipe(recipe))


def _inputs(model) -> dict[str, qat.QuantSpec]:
    return {n: m.input_quantizer.spec for n, m in model.named_modules() if getattr(m, "input_quantizer", None)}


@pytest.mark.parametrize("recipe", ["w8a8", "fp8_block", "mxfp8", "nvfp4_w4a8", "mxfp4_w4a4", "nvfp4_w4a4",
                                    "nvfp4_w4a4_lsq",
                                    {**qat.load_recipe("w8a8").to_dict(), "input": {**INT8, "symmetric": False}}],
                         ids=["int8_token", "fp8_1x128", "mxfp8", "fp8_token", "mxfp4", "nvfp4_static_global",
                              "nvfp4_lsq_static_global", "int8_token_asym"])
def test_dynamic_input_schemes_reload_exactly_in_qats_own_loader(recipe, tmp_path):
    """qat's loader re-attaches the written schemes: the reload computes the fake-quant logits, atol 0. (Another
    runtime may compute MX activation scales its own way: `test_mx_activation_scales_differ_in_compressed_tensors`.)
    NVFP4's static global is calibrated by the first batch and pinned from `<m>.input_global_scale` on reload."""
    model = _model(recipe)
    with torch.no_grad():
        want = model(IDS).logits
        loaded = load_any(export(model, tmp_path / "ct", "compressed_tensors"))
        assert _inputs(loaded) == _inputs(model) and len(_inputs(model)) == 14
        assert torch.equal(loaded(IDS).logits, want)


def test_w4a8_kv4_rot_reloads_its_a8_with_the_rotations(tmp_path, caplog):
    """The issue's case: A8 was dropped silently. R4 (256, a power of two) and R3 are stored; the per-token KV4
    has no place in compressed-tensors (warned at export), so the reference is the model without it (R3 then
    rotates only unquantized keys: equal up to float rounding)."""
    model = _model("w4a8_kv4_rot")
    with caplog.at_level(logging.WARNING):
        loaded = load_any(export(model, tmp_path / "ct", "compressed_tensors"))
    assert "KV cache int4 asym per_token dyn" in caplog.text and "not re-attached" not in caplog.text
    assert hasattr(loaded.model.layers[0].mlp.down_proj, "input_rotation")
    assert _inputs(loaded) == _inputs(model)
    for module in model.modules():
        if hasattr(module, "k_quantizer"):
            module.k_quantizer = module.v_quantizer = None
    with torch.no_grad():
        want, got = model(IDS).logits, loaded(IDS).logits
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
        for n, m in loaded.named_modules():  # what the loader did before: float activations, 1e-2 away
            if getattr(m, "input_quantizer", None) is not None:
                m.input_quantizer = None
        assert not torch.allclose(loaded(IDS).logits, want, atol=1e-3)


def _rewrite(folder, group_edit, tensors=None):
    """Edit an export as another tool could have written it (its checksums dropped: foreign folders have none)."""
    config = json.loads((folder / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group_edit(group)
    (folder / "config.json").write_text(json.dumps(config))
    if tensors:
        write_safetensors({**load_safetensors(folder / "model.safetensors"), **tensors}.items(),
                          folder / "model.safetensors")
    (folder / "qat_checksums.json").unlink(missing_ok=True)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_static_per_tensor_input_scales_are_pinned(symmetric, tmp_path):
    """A static per-tensor int8 input scheme (llm-compressor's W8A8 static layout: `<m>.input_scale`,
    `<m>.input_zero_point` signed) reloads as a static qat input quantizer with exactly those qparams."""
    static = {"bits": 8, "symmetric": symmetric, "granularity": "per_tensor", "dynamic": False}
    reference = _model({**qat.load_recipe("w8a8").to_dict(), "input": static})
    qat.calibrate(reference, [IDS])
    stored = {}
    for n, spec in _inputs(reference).items():
        scale, zp = reference.get_submodule(n).input_quantizer.qparams(torch.empty(0))
        stored[f"{n}.input_scale"] = scale.reshape(1).float()
        if not symmetric:
            stored[f"{n}.input_zero_point"] = (zp.reshape(1) - 128).to(torch.int8)
    out = export(_model("w8a8"), tmp_path / "ct", "compressed_tensors")  # the same int8 weights
    _rewrite(out, lambda g: g["input_activations"].update(dynamic=False, strategy="tensor", symmetric=symmetric),
             stored)
    loaded = load_any(out)
    assert _inputs(loaded) == _inputs(reference)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, reference(IDS).logits)


def test_schemes_it_cannot_reattach_are_warned_naming_the_modules(tmp_path, caplog):
    """A `dynamic: local` scheme other than NVFP4's (which is re-attached: group 16 here would be) and output
    activations are warned about, naming the modules."""
    out = export(_model("w8a8"), tmp_path / "ct", "compressed_tensors")
    local_g32 = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 32,
                 "dynamic": "local", "scale_dtype": "torch.float8_e4m3fn"}
    globals_ = {f"model.layers.{i}.{p}.input_global_scale": torch.ones(1) for i in range(2)
                for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    _rewrite(out, lambda g: g.update(input_activations=local_g32, output_activations={"num_bits": 8, "type": "int",
                                                                                     "dynamic": True}), globals_)
    with caplog.at_level(logging.WARNING):
        loaded = load_any(out)
    assert not _inputs(loaded)
    assert "dynamic='local'" in caplog.text and "output_activations" in caplog.text
    assert "14 layer(s) (model.layers.0.self_attn.q_proj" in caplog.text and "not re-attached" in caplog.text


def test_nvfp4_input_without_its_global_scale_is_refused_naming_the_tensor(tmp_path):
    model = _model("nvfp4_w4a4")
    qat.calibrate(model, [IDS])
    out = export(model, tmp_path / "ct", "compressed_tensors")
    stored = load_safetensors(out / "model.safetensors")
    del stored["model.layers.0.self_attn.q_proj.input_global_scale"]
    write_safetensors(stored.items(), out / "model.safetensors")
    (out / "qat_checksums.json").unlink(missing_ok=True)
    with pytest.raises(BadFileError, match=r"model\.layers\.0\.self_attn\.q_proj\.input_global_scale is missing"):
        load_any(out)


def test_the_args_read_back_as_the_scheme_written():
    for name in ("w8a8", "fp8_block", "mxfp8", "nvfp4_w4a8", "w4a8_kv4_rot", "mxfp4_w4a4", "nvfp4_w4a4"):
        spec = qat.load_recipe(name).base.input
        assert input_spec(input_args(spec, "m")) == spec, name


@pytest.mark.parametrize("recipe,preset", [("mxfp4_w4a4", "MXFP4"), ("mxfp8", "MXFP8"), ("fp8_dynamic", "FP8_DYNAMIC"),
                                           ("nvfp4_w4a4", "NVFP4")])
def test_written_input_args_are_compressed_tensors_presets(recipe, preset):
    """What the writer stores parses in compressed-tensors as its own preset's input_activations (#12: MXFP4's A4,
    NVFP4's A4 with its static global)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    written = input_args(qat.load_recipe(recipe).base.input, "m")
    assert QuantizationArgs(**written) == PRESET_SCHEMES[preset]["input_activations"]
    mxfp4 = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group", "group_size": 32,
             "dynamic": True, "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"}  # compressed-tensors' MXFP4
    assert input_spec(mxfp4) == qat.load_recipe("mxfp4_w4a4").base.input
    assert "strategy='block'" in input_spec({"num_bits": 8, "type": "float", "dynamic": True, "strategy": "block"})


def test_unwritable_float_inputs_are_warned_naming_their_format(tmp_path, caplog):
    """An fp4 activation scheme with no input_activations form (static MX ranges) is written weights-only, the
    warning naming the scheme's own format (it said NVFP4 for every one). NVFP4's static global has a form now
    (written); its dynamic global is refused (tests/unit/test_nvfp4.py)."""
    base = qat.load_recipe("mxfp4_w4a4").to_dict()
    model = _model({**base, "input": {**base["input"], "dynamic": False}})
    qat.calibrate(model, [IDS])
    with caplog.at_level(logging.WARNING):
        export(model, tmp_path / "ct", "compressed_tensors")
    line, = [r.getMessage() for r in caplog.records if "written without an input scheme" in r.getMessage()]
    assert "14 layer(s) have MXFP4 activations" in line and "model.layers.0.self_attn.q_proj" in line
    assert "NVFP4" not in line
    nvfp4 = _model("nvfp4_w4a4")
    qat.calibrate(nvfp4, [IDS])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        export(nvfp4, tmp_path / "nv", "compressed_tensors")
    assert "without an input scheme" not in caplog.text


@pytest.mark.parametrize("recipe, block_max, ours, theirs", [("mxfp4_w4a4", 7.5, 6.0, 8.0),
                                                             ("mxfp8", 479.0, 448.0, 480.0)])
def test_mx_activation_scales_differ_in_compressed_tensors(recipe, block_max, ours, theirs, tmp_path, caplog):
    """What docs/export.md says: compressed-tensors' own dynamic path (compute_dynamic_scales_and_zp +
    fake_quantize) on the written input_activations scales a block otherwise than qat's fake quant (qat: scale 1,
    saturating; compressed-tensors: scale 2), so the export warns once, naming the recipe."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    model = _model(recipe)
    quantizer = model.model.layers[0].self_attn.q_proj.input_quantizer
    x = torch.zeros(1, 1, 128)
    x[..., 0] = block_max
    with caplog.at_level(logging.WARNING):
        out = export(model, tmp_path / "ct", "compressed_tensors")
    group, = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    args = ct.QuantizationArgs(**group["input_activations"])
    scale, zero_point = compute_dynamic_scales_and_zp(x, args, module=None)
    assert quantizer(x)[0, 0, 0].item() == ours and scale.flatten()[0].item() == 2.0
    assert fake_quantize(x, scale, zero_point, args)[0, 0, 0].item() == theirs
    lines = [r.getMessage() for r in caplog.records if "computes their E8M0 scales its own way" in r.getMessage()]
    assert len(lines) == 1 and f"recipe {recipe}" in lines[0] and "14 layer(s)" in lines[0]
