"""MXFP8 (E4M3 under an E8M0 scale per 32), weights and dynamic activations: E4M3 rounding against a brute-force
search, the OCP scale rule, exact convert / native / compressed-tensors (decoded by its own MXFP8 decompressor)."""
from __future__ import annotations

import json

import torch

import qat
from qat.export import export_compressed_tensors, load_compressed_tensors, save_native
from qat.formats import bits_per_weight
from qat.formats.mxfp8 import mxfp8_spec
from qat.primitives import choose_qparams, compute_range, fake_quantize_forward
from qat.testing import tiny_llama

E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3 = E4M3[torch.isfinite(E4M3)].unique()


def _nearest(x: torch.Tensor) -> torch.Tensor:
    """Nearest finite E4M3 value (saturating at 448), ties to the even code, by exhaustive search."""
    x = x.clamp(-448, 448)
    err = (x.double().unsqueeze(-1) - E4M3.double()).abs()
    cand = err == err.min(-1, keepdim=True).values
    even = E4M3.abs().to(torch.float8_e4m3fn).view(torch.uint8) % 2 == 0  # the code's last mantissa bit
    pick = torch.where(cand.sum(-1) > 1, (cand & even).int().argmax(-1), cand.int().argmax(-1))
    return E4M3[pick]


def test_e4m3_elements_and_the_ocp_scale():
    spec = mxfp8_spec()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 128, generator=g) * 3
    w[0, :32] = torch.linspace(-500, 500, 32) * 2.0**-8  # amax 500 * 2^-8: X = 2^-8, and 500 > 448 saturates
    w[1, :32] = 0.0
    scale, _ = choose_qparams(*compute_range(w, spec), spec)
    assert float(scale[0, 0, 0]) == 2.0**-8
    amax = w.reshape(4, -1, 32).abs().amax(-1, keepdim=True)
    expect = torch.where(amax > 0, 2.0 ** (torch.floor(torch.log2(amax.double())) - 8), 2.0**-127).float()
    assert torch.equal(scale, expect)
    fake, mask = fake_quantize_forward(w, scale, None, spec, need_mask=True)
    view = w.reshape(4, -1, 32) / scale
    ties = torch.tensor([1.0625, 1.1875, 17.0, 19.0, 464.0, -1.0625, 2.0**-10, 3 * 2.0**-10])  # E4M3 midpoints
    expect = torch.tensor([1.0, 1.25, 16.0, 20.0, 448.0, -1.0, 0.0, 2.0**-8])
    assert torch.equal(_nearest(ties), expect)
    ours = fake_quantize_forward(ties.repeat(4).reshape(1, 32), torch.ones(1, 1, 1), None, spec)[0]
    assert torch.equal(ours, expect.repeat(4).reshape(1, 32))
    assert torch.equal(fake, (_nearest(view) * scale).reshape(4, 128))
    assert float(fake[0, 0]) == -448 * 2.0**-8 and not bool(mask[0, 0])
    assert bits_per_weight(spec, (4, 128)) == 8.25


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_converted_native_and_compressed_tensors_are_exact(token_ids, tmp_path):
    from compressed_tensors.compressors.mxfp8.base import MXFP8QuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    model = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe("mxfp8"))
    ref = _logits(model, token_ids)
    save_native(model, tmp_path / "native")
    out = export_compressed_tensors(model, tmp_path / "ct")
    qat.convert(model)
    assert torch.equal(_logits(model, token_ids), ref)  # weights and activations, atol=0
    assert torch.equal(_logits(qat.export.load_native(tmp_path / "native"), token_ids), ref)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    group = next(iter(q["config_groups"].values()))
    assert q["format"] == "mxfp8-quantized" and group["input_activations"]["group_size"] == 32
    scheme = QuantizationScheme(targets=["Linear"], weights=group["weights"])
    t = load_file(out / "model.safetensors")
    loaded = load_compressed_tensors(out)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        sd = {k.rpartition(".")[2]: v for k, v in t.items() if k.startswith(name + ".weight")}
        theirs = MXFP8QuantizationCompressor.decompress(sd, scheme)["weight"]
        assert torch.equal(theirs.float(), model.get_submodule(name).weight.float())  # atol=0
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight)
