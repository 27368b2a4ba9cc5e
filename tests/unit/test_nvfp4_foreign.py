"""NVFP4 checkpoints other tools write: a compressed-tensors `nvfp4-pack-quantized` model made with compressed-tensors'
own code, as llm-compressor makes it (`targets: [Linear]`, `ignore: [lm_head]`, weight_global_scale = 448 * 6 / amax,
not a power of two), reads in qat to exactly the weights compressed-tensors' decompression gives (and the logits
transformers computes with it), and writes back the same global, block scales and nibbles."""
from __future__ import annotations

import logging
import math

import gguf
import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.quant_scheme import NVFP4A16
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

import qat
from qat.errors import BadFileError
from qat.export import (export_compressed_tensors, export_gguf, load_compressed_tensors, load_gguf, load_native,
                        save_native)
from qat.export.compressed_fp import pack_nibbles
from qat.export.ct_targets import group_targets
from qat.formats.minifloat import e2m1_index
from qat.formats.nvfp4 import gguf_tensor_scale, nvfp4_spec, split_scales, weight_spec_of
from qat.io import load_safetensors, write_safetensors
from qat.modules.quantized import QuantizedLinear, QuantizedWeight
from qat.testing import cast_as_loaded, tiny_llama

SCHEME = QuantizationScheme(targets=["Linear"], **NVFP4A16)


def write_as_llm_compressor(out, dtype: torch.dtype) -> None:
    """A tiny Llama quantized and saved by compressed-tensors' code as llm-compressor drives it: a minmax observer's
    `generate_gparam` global per weight, `calculate_qparams` block scales under it, the NVFP4 compressor."""
    model = tiny_llama(vocab_size=256, dtype=dtype)
    config = QuantizationConfig(config_groups={"group_0": SCHEME}, ignore=["lm_head"])
    apply_quantization_config(model, config, show_progress=False)
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        w = module.weight.data
        g = generate_gparam(w.min(), w.max())
        blocks = w.reshape(w.shape[0], -1, 16)
        args = module.quantization_scheme.weights
        scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=g)
        module.weight_global_scale.data.copy_(g)
        module.weight_scale.data.copy_(scale)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def foreign(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("ct_nvfp4")
    write_as_llm_compressor(out, request.param)
    return out


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _ct_tensors(stored, name):
    return {k: stored[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_global_scale")}


def test_weights_are_compressed_tensors_own_decompression(foreign):
    stored = load_safetensors(foreign / "model.safetensors")
    model = load_compressed_tensors(foreign)  # targets [Linear], ignore [lm_head]: resolved as compressed-tensors does
    linears = _linears(model)
    assert len(linears) == 14 and "lm_head" not in linears
    before = after = 0
    for name, lin in linears.items():
        t = _ct_tensors(stored, name)
        g = t["weight_global_scale"]
        assert not math.log2(float(g)).is_integer()  # 448 * 6 / amax: qat's own weights have a power of two
        assert lin.qweight.spec == nvfp4_spec(static_global=True)
        theirs = NVFP4PackedCompressor.decompress(t, SCHEME)["weight"]  # bfloat16, as transformers gets it
        assert torch.equal(lin.qweight.dequantize(torch.bfloat16), theirs)  # atol=0
        rows, cols = t["weight_packed"].shape
        q = unpack_fp4_from_uint8(t["weight_packed"], rows, 2 * cols, dtype=torch.float32)
        theirs32 = ct_dequantize(q, t["weight_scale"].float(), args=SCHEME.weights, global_scale=g, dtype=torch.float32)
        assert torch.equal(lin.qweight.dequantize(torch.float32), theirs32)  # and in float32
        # the earlier reading (block scales put back on qat's power-of-two grid) is not these weights
        old = QuantizedWeight(nvfp4_spec(), lin.qweight.shape)
        old.set_codes(lin.qweight.codes(), lin.qweight.qparams()[0], None)
        before += int((old.dequantize(torch.float32) != theirs32).sum())
        after += theirs32.numel()
    assert before > after / 2  # most elements moved (up to a few %)


def test_transformers_and_qat_compute_the_same_logits(foreign, token_ids):
    """transformers + compressed-tensors load the checkpoint (CPU: bfloat16, weights decompressed by compressed-tensors)
    and run it; qat's loaded model cast to bf16 as a checkpoint loads (`cast_as_loaded`) gives the same logits."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(foreign, dtype=torch.bfloat16)
    ours = cast_as_loaded(load_compressed_tensors(foreign), torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(token_ids).logits, hf(token_ids).logits)  # atol=0


def test_reexport_writes_the_same_global_scales_and_nibbles(foreign, tmp_path, token_ids):
    stored = load_safetensors(foreign / "model.safetensors")
    model = load_compressed_tensors(foreign)
    again = load_safetensors(export_compressed_tensors(model, tmp_path / "ct") / "model.safetensors")
    keys = [k for k in stored if ".weight_" in k]
    assert len(keys) == 3 * 14
    for k in keys:
        assert again[k].dtype == stored[k].dtype
        assert torch.equal(again[k].view(torch.uint8), stored[k].view(torch.uint8))
    packed = torch.cat([stored[k].reshape(-1) for k in keys if k.endswith("weight_packed")])
    assert bool(((packed & 0x0F) == 8).any())  # compressed-tensors' negative zeros, held as stored
    with torch.no_grad():
        ref = model(token_ids).logits
        save_native(model, tmp_path / "native")
        assert torch.equal(load_native(tmp_path / "native")(token_ids).logits, ref)  # the held global, natively
        assert torch.equal(load_compressed_tensors(tmp_path / "ct")(token_ids).logits, ref)


def test_gguf_keeps_the_stored_blocks_under_a_rounded_multiplier_and_says_so(foreign, tmp_path, caplog, token_ids):
    model = load_compressed_tensors(foreign)
    with caplog.at_level(logging.WARNING):
        path = export_gguf(model, tmp_path / "m.gguf", gguf_type="F32")  # the NVFP4 weights stay NVFP4
    assert "14 NVFP4 tensor(s) hold a global that is not a power of two" in caplog.text
    assert "re-quantized" not in caplog.text
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    lin = model.model.layers[1].mlp.down_proj.qweight  # no q/k row permutation
    blocks, g = tensors["blk.1.ffn_down.weight"], tensors["blk.1.ffn_down.scale"]
    assert blocks.tensor_type == T.NVFP4
    decoded = torch.from_numpy(gq.dequantize(blocks.data, T.NVFP4).reshape(lin.shape).copy())
    m = float(g.data.reshape(-1)[0])
    e, held = lin.stored_global()  # the stored E4M3 block scales and G
    pow2 = gguf_tensor_scale(e)  # the blocks hold e * 2^k (exact), the multiplier is 2^-k / G rounded once
    assert m == float((pow2 / held)[0])
    values = lin.codes().float() / 2 * e.reshape(lin.shape[0], -1).repeat_interleave(16, 1)  # E2M1 * e4m3
    assert torch.equal(decoded * pow2, values)  # gguf-py decodes the same values exactly (e4m3 * 2^k, codes)
    nibbles = torch.cat([torch.from_numpy(t.data.reshape(-1, 36)[:, 4:].copy()).reshape(-1) for t in tensors.values()
                         if t.tensor_type == T.NVFP4])
    assert not bool(((nibbles & 0x0F) == 8).any() or ((nibbles >> 4) == 8).any())  # re-encoded: a stored -0 is +0
    ours = lin.dequantize(torch.float32)
    ulp = torch.finfo(torch.float32).eps * ours.abs()
    assert bool(((decoded * m - ours).abs() <= ulp).all())  # one float32 rounding (of 1 / G), not bit-exact
    with torch.no_grad():  # qat's GGUF loader applies the multiplier to the weights (F32 file: compare in float32)
        assert torch.allclose(load_gguf(path)(token_ids).logits, model.float()(token_ids).logits, atol=1e-5, rtol=0)


def test_own_exports_keep_the_power_of_two_form(token_ids, tmp_path):
    model = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe("nvfp4_w4a16"))
    loaded = load_compressed_tensors(export_compressed_tensors(model, tmp_path / "ct"))
    assert {lin.qweight.spec for lin in _linears(loaded).values()} == {nvfp4_spec()}


DOWN = "model.layers.0.mlp.down_proj"
EDITS = {  # tensor -> (edit, what the refusal says)
    "packed_int8": ("weight_packed", lambda x: x.view(torch.int8), r"weight_packed is torch.int8 .* uint8"),
    "negative_block": ("weight_scale", lambda x: (-x.float().abs().clamp(min=1)).to(torch.float8_e4m3fn),
                       r"weight_scale holds negative or NaN E4M3 block scales"),
    "nan_block": ("weight_scale", lambda x: torch.full_like(x.float(), float("nan")).to(torch.float8_e4m3fn),
                  r"weight_scale holds negative or NaN"),
    "zero_global": ("weight_global_scale", torch.zeros_like, r"weight_global_scale is 0.0; .*finite and > 0"),
    "negative_global": ("weight_global_scale", lambda x: -x, r"weight_global_scale is -.*finite and > 0"),
    "inf_global": ("weight_global_scale", lambda x: torch.full_like(x, float("inf")), r"weight_global_scale is inf; "),
}


@pytest.fixture(scope="module")
def own_nvfp4(tmp_path_factory):
    """qat's own NVFP4 export of a tiny Llama whose first down_proj block is all zero (its E4M3 block scale is 0)."""
    model = tiny_llama(vocab_size=256)
    with torch.no_grad():
        model.get_submodule(DOWN).weight[0, :16] = 0
    model = qat.prepare(model, qat.load_recipe("nvfp4_w4a16"))
    return export_compressed_tensors(model, tmp_path_factory.mktemp("own_nvfp4") / "ct"), model


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_edited_nvfp4_tensors_are_refused_naming_the_tensor(own_nvfp4, edit, tmp_path):
    """compressed-tensors unpacks uint8 only and writes block scales and globals > 0: another dtype, a negative /
    NaN block scale, a global <= 0 or not finite is a BadFileError naming the folder and the tensor."""
    src, _ = own_nvfp4
    key, fn, match = EDITS[edit]
    t = load_safetensors(src / "model.safetensors")
    t[f"{DOWN}.{key}"] = fn(t[f"{DOWN}.{key}"])
    out = tmp_path / "ct"
    out.mkdir()
    (out / "config.json").write_text((src / "config.json").read_text())  # no qat_checksums.json: another tool's
    write_safetensors(t.items(), out / "model.safetensors")
    with pytest.raises(BadFileError, match=rf"{out}: .*{DOWN}\.{match}"):
        load_compressed_tensors(out)


def test_an_all_zero_block_has_block_scale_zero_and_reloads(own_nvfp4, token_ids):
    src, model = own_nvfp4
    assert float(load_safetensors(src / "model.safetensors")[f"{DOWN}.weight_scale"][0, 0].float()) == 0.0
    with torch.no_grad():
        assert torch.equal(load_compressed_tensors(src)(token_ids).logits, model(token_ids).logits)


def test_held_global_storage():
    g = torch.tensor([2688.0 / 0.7])  # not a power of two
    blocks = (torch.rand(4, 2) * 448).to(torch.float8_e4m3fn)
    assert weight_spec_of(blocks, g).static_global
    own_blocks, own_g = split_scales(torch.rand(4, 2, 1) / 7)
    assert weight_spec_of(own_blocks.reshape(4, 2), own_g) == nvfp4_spec()  # qat's power-of-two form stays plain
    doubled = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, -1, -2, -3, -4, -6, -8, -12], dtype=torch.int8)  # 2 * E2M1
    codes = doubled[torch.randint(0, len(doubled), (4, 32), generator=torch.Generator().manual_seed(0))]
    spec = nvfp4_spec(static_global=True)
    qw = QuantizedWeight(spec, (4, 32))
    qw.set_codes(codes, blocks.float().reshape(4, 2, 1) / g, None, global_scale=g)
    assert torch.equal(qw.scale[:-4], blocks.reshape(-1).view(torch.uint8))  # the stored bytes, as given
    assert torch.equal(qw.scale[-4:].view(torch.float32), g)
    assert torch.equal(qw.packed, pack_nibbles(e2m1_index(codes)).reshape(-1))  # compressed-tensors' nibble layout
    want = codes.float().reshape(4, 2, 16) / 2 * (blocks.float().reshape(4, 2, 1) / g)
    assert torch.equal(qw.dequantize(), want.reshape(4, 32))
    with pytest.raises(ValueError, match="held global.*global_scale=G"):
        QuantizedWeight.from_tensor(torch.randn(4, 32), spec)


def test_targets_resolve_as_compressed_tensors_matches_them(caplog):
    layers = ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    classes = lambda n: ["Linear", "Module"]  # noqa: E731
    groups = {"a": {"targets": ["re:.*mlp.*"]}, "b": {"targets": ["Linear"]}}  # down_proj: both; the regex wins
    assert group_targets(groups, ["lm_head"], layers, classes, "config.json") == {
        "model.layers.0.mlp.down_proj": "a", "model.layers.0.self_attn.q_proj": "b"}
    groups = {"a": {"targets": ["re:.*mlp.*"]}, "b": {"targets": ["model.layers.0.self_attn.q_proj"]}}
    assert group_targets(groups, [], layers, classes, "config.json") == {
        "model.layers.0.mlp.down_proj": "a", "model.layers.0.self_attn.q_proj": "b"}
    assert group_targets({"b": {"targets": ["Linear"]}}, ["re:.*proj$"], layers, classes, "f") == {"lm_head": "b"}
    with caplog.at_level(logging.WARNING):
        assert group_targets({"b": {"targets": ["Embedding"]}}, [], layers, classes, "f") == {}
    assert "config group 'b' (targets ['Embedding']) matches no quantized layer of f; its scheme is not applied" \
        in caplog.text
