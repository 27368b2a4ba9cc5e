"""GGUF for the MoE families: experts stacked as llama.cpp's ffn_{gate,up,down}_exps, the router in F32, the
expert metadata, llama.cpp's MoE type rules, format-exact export of a model prepared on a GGUF grid, import back
to the transformers class; and, where llama.cpp is built (QAT_LLAMA_CPP), llama.cpp runs the files and its
log-probs match qat's."""
from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch

import qat
from qat.export import export_gguf, load_any
from qat.export.gguf_import import load_gguf
from qat.testing import MOE_FAMILIES, tiny_moe

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_llama_cpp", ROOT / "scripts" / "check_llama_cpp.py")
check = sys.modules.setdefault("check_llama_cpp", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(check)
BIN = check.find_llama_cpp()
needs_llama_cpp = pytest.mark.skipif(BIN is None, reason="llama.cpp not found: set QAT_LLAMA_CPP to a llama.cpp build")
TEXT = (ROOT / "configs" / "data" / "tiny_corpus.txt").read_text()
CLASSES = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM"}
ARCH = {"qwen3_moe": "qwen3moe", "mixtral": "llama", "olmoe": "olmoe"}


def _model(family):
    return tiny_moe(family, vocab_size=320, hidden_size=256, expert_size=256, num_experts=8)


def _types(path):
    return {t.name: (t.tensor_type.name, [int(d) for d in t.shape]) for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("recipe", ["gguf_q4_k", "gguf_q8_0"])
def test_prepared_moe_exports_format_exact_and_imports_back(family, recipe, tmp_path):
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    model = qat.prepare(_model(family), recipe)
    fake = model(ids).logits
    path = export_gguf(model, tmp_path / "m.gguf", "F32")  # quantized tensors keep their trained type
    types = _types(path)
    kind = {"gguf_q4_k": "Q4_K", "gguf_q8_0": "Q8_0"}[recipe]
    assert types["blk.0.ffn_gate_exps.weight"] == (kind, [256, 256, 8])  # GGUF dims: ne0 = row, ne2 = expert
    assert types["blk.0.ffn_up_exps.weight"] == (kind, [256, 256, 8])
    assert types["blk.1.ffn_down_exps.weight"] == (kind, [256, 256, 8])
    assert types["blk.0.ffn_gate_inp.weight"] == ("F32", [256, 8])
    fields = gguf.GGUFReader(str(path)).fields
    arch = ARCH[family]
    assert fields["general.architecture"].contents() == arch
    assert fields[f"{arch}.expert_count"].contents() == 8 and fields[f"{arch}.expert_used_count"].contents() == 2
    if family == "qwen3_moe":
        assert fields["qwen3moe.expert_feed_forward_length"].contents() == 256
    back = load_gguf(path)
    assert type(back).__name__ == CLASSES[family]
    assert torch.equal(back(ids).logits, fake)
    assert torch.equal(load_any(path)(ids).logits, fake)


def test_moe_type_rules_in_q4_k_m():
    """llama.cpp's rules for 8 experts: attn_v / attn_k Q8_0, attn_output Q5_K, ffn_down_exps by layer."""
    from qat.export.gguf_export import plan_types

    types = {e.name: e.type for e in plan_types(_model("qwen3_moe"), "Q4_K_M")}
    assert types["blk.0.attn_v.weight"] == types["blk.1.attn_k.weight"] == "Q8_0"
    assert types["blk.0.attn_output.weight"] == "Q5_K" and types["blk.0.attn_q.weight"] == "Q4_K"
    assert types["blk.0.ffn_down_exps.weight"] == "Q4_K" and types["blk.1.ffn_down_exps.weight"] == "Q6_K"
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.0.ffn_up_exps.weight"] == "Q4_K"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"


def test_converted_moe_exports_like_the_prepared_one(tmp_path):
    model = qat.prepare(_model("mixtral"), "gguf_q4_k")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = export_gguf(model, tmp_path / "a" / "m.gguf", "F32")
    b = export_gguf(qat.convert(copy.deepcopy(model)), tmp_path / "b" / "m.gguf", "F32")
    blocks = lambda p: {t.name: (t.tensor_type, bytes(t.data)) for t in gguf.GGUFReader(str(p)).tensors}  # noqa: E731
    assert blocks(a) == blocks(b)  # the same blocks (a converted model lists its tensors in another order)


@needs_llama_cpp
@pytest.mark.parametrize("gguf_type", ["Q4_K_M", "Q8_0"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_tensor_types_equal_llama_quantize(family, gguf_type, tmp_path):
    model, tok = check.tiny_model_and_tokenizer(TEXT, model_type=family)
    ours = export_gguf(model, tmp_path / "ours.gguf", gguf_type, tokenizer=tok)
    f32 = export_gguf(model, tmp_path / "f32.gguf", "F32", tokenizer=tok)
    theirs = tmp_path / "theirs.gguf"
    proc = subprocess.run([str(BIN / "llama-quantize"), str(f32), str(theirs), gguf_type, "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {n: t for n, (t, _) in _types(ours).items()} == {n: t for n, (t, _) in _types(theirs).items()}


@needs_llama_cpp
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_llama_cpp_runs_the_moe(family, tmp_path):
    """llama.cpp runs the MoE files. The float model in F32 matches to 1e-3 (the graph, names, expert layout and
    metadata are right). The model prepared on Q4_K, exported as it stands, computes what the fake-quant model
    computes up to llama.cpp's 8-bit activations in its Q4_K dot products; in an MoE these also flip the top-k
    choice of a few near-tied tokens, so the largest log-prob difference is wider than Llama's 5e-2 (measured:
    0.115 qwen3_moe, 0.014 mixtral, 0.086 olmoe; mean 0.004) while perplexities agree to 0.2%."""
    model, tok = check.tiny_model_and_tokenizer(TEXT, model_type=family)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    f32 = export_gguf(model, tmp_path / "f32.gguf", "F32", tokenizer=tok)
    ref = check.llama_perplexity(BIN, f32, text, 64, 2, tmp_path)
    res = check.compare(load_any(f32), ref)  # qat's GGUF loader of the same file
    assert res["max_abs"] < 1e-3 and abs(res["ppl"] / ref.ppl - 1) < 1e-3, (res, ref.ppl)
    prepared = qat.prepare(model, "gguf_q4_k")
    path = export_gguf(prepared, tmp_path / "m.gguf", "F32", tokenizer=tok)
    ref = check.llama_perplexity(BIN, path, text, 64, 2, tmp_path)
    for res in (check.compare(prepared.eval(), ref), check.compare(load_any(path), ref)):
        assert res["max_abs"] < 0.15 and res["mean_abs"] < 1e-2, res
        assert abs(res["ppl"] / ref.ppl - 1) < 2e-2, (res, ref.ppl)
        assert res["top1"] > 0.85, res


def test_qat_export_cli_writes_a_moe_folder_to_gguf(tmp_path):
    """qat-export's pre-checks name a fused MoE weight by its GGUF parts (they refused every MoE before)."""
    from qat.cli.export import main

    tiny_moe(num_experts=4).save_pretrained(tmp_path / "moe")
    out = tmp_path / "moe.gguf"
    main([f"model.path={tmp_path / 'moe'}", "format=gguf", "gguf_type=F32", f"output={out}",
          f"hydra.run.dir={tmp_path / 'run'}"])
    names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight"} <= names
