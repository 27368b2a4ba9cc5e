"""FP8 block scaling (128 x 128 weight blocks, 1 x 128 dynamic activation groups): one scale per square block
(a shorter last band of rows too), exact convert / native, and compressed-tensors' own float-quantized block
decompressor decoding our tensors to exactly our weights."""
from __future__ import annotations

import json

import pytest
import torch

import qat
from qat.export import export_compressed_tensors, load_compressed_tensors, save_native
from qat.formats import bits_per_weight
from qat.formats.fp8_block import fp8_block_spec
from qat.primitives import choose_qparams, compute_range, fake_quantize_forward
from qat.testing import tiny_llama


def test_one_scale_per_square_block_and_ragged_bands():
    spec = fp8_block_spec(32)
    w = torch.randn(72, 64, generator=torch.Generator().manual_seed(0))
    scale, _ = choose_qparams(*compute_range(w, spec), spec)
    for r0, c0 in ((0, 0), (32, 32), (64, 0)):  # the last band has 8 rows
        block = w[r0:r0 + 32, c0:c0 + 32]
        assert torch.equal(scale[r0:r0 + 32, c0 // 32].flatten(), torch.full((min(32, 72 - r0),), float(block.abs().max() / 448)))
    fake = fake_quantize_forward(w, scale, None, spec)[0]
    codes = (w.reshape(72, 2, 32) / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(fake, (codes * scale).reshape(72, 64))
    assert bits_per_weight(fp8_block_spec(), (256, 512)) == 8 + 32 / (128 * 128)
    with pytest.raises(ValueError, match="FP8 block scaling.*dynamic=False"):
        qat.QuantSpec(bits=8, dtype="fp8_e4m3", granularity="per_group", group_size=128, grid="block", dynamic=True)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_converted_native_and_compressed_tensors_are_exact(token_ids, tmp_path):
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    model = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe("fp8_block"))
    ref = _logits(model, token_ids)
    save_native(model, tmp_path / "native")
    out = export_compressed_tensors(model, tmp_path / "ct")
    qat.convert(model)
    assert torch.equal(_logits(model, token_ids), ref)  # weights and 1 x 128 activations, atol=0
    assert torch.equal(_logits(qat.export.load_native(tmp_path / "native"), token_ids), ref)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    group = next(iter(q["config_groups"].values()))
    assert q["format"] == "float-quantized" and group["weights"]["block_structure"] == [128, 128]
    assert group["input_activations"]["group_size"] == 128 and group["input_activations"]["type"] == "float"
    scheme = QuantizationScheme(targets=["Linear"], weights=group["weights"])
    t = load_file(out / "model.safetensors")
    loaded = load_compressed_tensors(out)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        sd = {k.rpartition(".")[2]: v for k, v in t.items() if k.startswith(name + ".weight")}
        theirs = FloatQuantizationCompressor.decompress(sd, scheme)["weight"]
        assert torch.equal(theirs.float(), model.get_submodule(name).weight.float())  # atol=0
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight)


def test_learned_block_scale_is_one_parameter_per_block_with_the_block_gradient():
    """LSQ on FP8 blocks: each band of rows quantizes with its first row's parameter (what the export stores), and
    that parameter gets the whole block's LSQ gradient (1 / sqrt(N qmax) with N = the block's elements)."""
    from qat.modules.quantizer import TensorQuantizer
    from qat.ste import learned_fake_quantize

    spec = fp8_block_spec(16).replace(learn="lsq")
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(0)).requires_grad_()  # last band: 8 rows
    q = TensorQuantizer(spec, "weight", w.detach())
    rtn, _ = choose_qparams(*compute_range(w.detach(), fp8_block_spec(16)), fp8_block_spec(16))
    assert torch.equal(q(w).detach(), fake_quantize_forward(w.detach(), rtn, None, fp8_block_spec(16))[0])
    with torch.no_grad():
        q.scale.mul_(torch.linspace(0.9, 1.1, 40).reshape(40, 1, 1))  # rows inside a band now differ
    used = q.scale.detach()[::16].repeat_interleave(16, 0)[:40]
    out = q(w)
    assert torch.equal(out.detach(), fake_quantize_forward(w.detach(), used, None, fp8_block_spec(16))[0])
    upstream = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    (out * upstream).sum().backward()
    leaf = used.clone().requires_grad_()  # reference: every row its own scale, then the band's sum
    (learned_fake_quantize(w.detach(), leaf, None, spec, "lsq") * upstream).sum().backward()
    per_block = torch.stack([leaf.grad[r:r + 16].sum(0) for r in range(0, 40, 16)]) / 4  # / sqrt(16 rows)
    assert torch.allclose(q.scale.grad[::16], per_block, rtol=1e-5, atol=1e-8)
    unused = torch.ones(40, dtype=torch.bool)
    unused[::16] = False
    assert not q.scale.grad[unused].any()


def test_learned_block_scales_train_and_export_exactly(token_ids, tmp_path):
    recipe = qat.load_recipe("fp8_block_lsq").to_dict()
    recipe["weight"]["group_size"] = 32  # several bands of rows and blocks of columns on the tiny model
    recipe["input"] = None
    model = qat.prepare(tiny_llama(vocab_size=256), recipe)
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if n.endswith("scale")], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(token_ids, labels=token_ids).loss.backward()
        opt.step()
    ref = _logits(model, token_ids)
    out = export_compressed_tensors(model, tmp_path / "ct")
    assert torch.equal(_logits(load_compressed_tensors(out), token_ids), ref)
    assert torch.equal(_logits(qat.convert(model), token_ids), ref)
