"""Every dense family end to end on a tiny random model from its real transformers config class: what a recipe
quantizes, converted == fake quant, a QAT step, RTN / GPTQ / AWQ / SmoothQuant through the adapter's mappings,
native / compressed-tensors / GGUF round trips with equal logits, and GGUF import of the export.
(llama.cpp runs each family's file in tests/export/test_llama_cpp.py.)"""
from __future__ import annotations

import copy

import gguf
import pytest
import torch
import transformers
from torch import nn

import qat
from qat.arch import get_arch
from qat.export import export_compressed_tensors, export_gguf, export_gptq, load_any, save_native
from qat.modules.fake import FakeQuantLinear
from qat.ptq import ptq_model
from qat.testing import VARIANTS, tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"]
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
             "phi3": "phi3"}
READ_AS = {"mistral": "llama"}  # llama.cpp's converter writes Mistral as a Llama; it reads back as one
W4 = {"name": "w4_g32", "targets": ["Linear"], "ignore": ["lm_head"],
      "weight": {"bits": 4, "symmetric": True, "granularity": "per_group", "group_size": 32}}
W8A8 = {"name": "w8a8_t", "targets": ["Linear"], "ignore": ["lm_head"],
        "weight": {"bits": 8, "granularity": "per_channel"},
        "input": {"bits": 8, "granularity": "per_tensor", "dynamic": False, "observer": "minmax"}}
VOCAB = 128


def family_model(family: str, **overrides) -> nn.Module:
    """hidden 64 (rows of 32-blocks), norms and biases perturbed so a wrong offset or layout shows."""
    return tiny_model(family, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, max_position_embeddings=64,
                      vector_noise=0.1, **overrides)


@pytest.fixture(scope="module", params=FAMILIES)
def base(request):
    return request.param, family_model(request.param)


@pytest.fixture
def fam(base):
    family, model = base
    return family, copy.deepcopy(model)


@pytest.fixture(scope="module")
def ids():
    # 24 tokens: past Gemma 3's sliding window of 16
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, VOCAB, (2, 32), generator=g) for _ in range(4)]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def linear_weights(model) -> dict[str, int]:
    return {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def test_registered_with_its_gguf_architecture(fam):
    family, model = fam
    assert get_arch(model).gguf_arch_name == GGUF_ARCH[family]
    assert qat.arch.gguf_reader_arch(GGUF_ARCH[family]) is get_arch(READ_AS.get(family, family))


def test_fused_qkv_takes_attn_v_types_in_the_k_mixes():
    from qat.export.gguf_export import mix_type

    qkv = [mix_type(f"blk.{i}.attn_qkv.weight", (96, 256), "Q4_K_M", 16, False) for i in range(16)]
    assert qkv == [mix_type(f"blk.{i}.attn_v.weight", (96, 256), "Q4_K_M", 16, False) for i in range(16)]
    assert qkv.count("Q6_K") == 8 and mix_type("blk.3.attn_qkv.weight", (96, 256), "Q4_K_S", 16, False) == "Q5_K"


def test_recipe_quantizes_every_linear_but_lm_head(fam):
    family, model = fam
    expected = linear_weights(model)
    total = sum(p.numel() for p in model.parameters())
    qat.prepare(model, W4)
    quantized = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert quantized == expected
    fused = {"phi3": {"self_attn.qkv_proj", "mlp.gate_up_proj"}}.get(family, {"self_attn.q_proj", "mlp.up_proj"})
    assert all(f"model.layers.1.{n}" in quantized for n in fused)
    assert sum(quantized.values()) / total > 0.75  # the rest: embeddings, lm_head, norms, biases


def test_converted_equals_fake_quant(fam, ids):
    _, model = fam
    qat.prepare(model, qat.QuantRecipe.from_dict({**W4, "input": W8A8["input"]}))
    qat.calibrate(model, [ids])
    fake = logits(model, ids)
    qat.convert(model)
    assert torch.equal(logits(model, ids), fake)


def test_one_qat_step_reaches_the_quantizers(fam, ids):
    _, model = fam
    qat.prepare(model, {**W4, "weight": {**W4["weight"], "learn": "lsq"}})
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [q.scale.grad for _, q in qat.quantizers(model)]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_ptq_methods_give_close_finite_logits(fam, ids, batches, method):
    family, model = fam
    ref = logits(model, ids)
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    out = logits(ptq_model(model, W4, method, None if method == "rtn" else batches, progress=False), ids)
    assert torch.isfinite(out).all()
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.3, rel  # 4-bit g32 on random weights; a broken layout gives ~1
    if method == "awq":  # the adapter's norm -> linear mapping was folded (through Gemma's 1 + weight)
        assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)


def test_smoothquant_folds_through_the_norms(fam, ids, batches):
    _, model = fam
    ref = logits(model, ids)
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    out = logits(ptq_model(model, W8A8, "smoothquant", batches, progress=False), ids)
    assert float((out - ref).norm() / ref.norm()) < 0.1
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)


def test_native_compressed_tensors_and_gptq_round_trips(fam, ids, tmp_path):
    _, model = fam
    qat.prepare(model, {**W4, "weight": {**W4["weight"], "scale_dtype": "fp16"}})  # GPTQ stores fp16 scales
    ref = logits(model, ids)
    save_native(model, tmp_path / "native")
    export_compressed_tensors(model, tmp_path / "ct")
    export_gptq(model, tmp_path / "gptq")
    for folder in ("native", "ct", "gptq"):
        assert torch.equal(logits(load_any(tmp_path / folder), ids), ref), folder
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")  # compressed-tensors' own decoder
    assert torch.equal(logits(hf, ids), ref)


def test_gguf_f32_round_trip_is_exact_and_imports_as_the_family(fam, ids, tmp_path):
    family, model = fam
    path = export_gguf(model, tmp_path / "m.gguf", "F32")
    assert gguf.GGUFReader(str(path)).fields["general.architecture"].contents() == GGUF_ARCH[family]
    back = load_any(path)
    assert back.config.model_type == READ_AS.get(family, family)
    assert torch.equal(logits(back, ids), logits(model, ids))
    for key in ("layer_types", "sliding_window", "tie_word_embeddings", "num_key_value_heads"):
        assert getattr(back.config, key, None) == getattr(model.config, key, None), key
    head_dim = lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # noqa: E731
    assert head_dim(back.config) == head_dim(model.config)
    # the import is a model qat prepares and exports again, to the same file contents
    again = export_gguf(qat.prepare(back, "gguf_q8_0"), tmp_path / "again.gguf", "Q8_0")
    first = export_gguf(model, tmp_path / "first.gguf", "Q8_0")
    assert torch.equal(logits(load_any(again), ids), logits(load_any(first), ids))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gguf_round_trip_of_config_variants(variant, ids, tmp_path):
    family, overrides = VARIANTS[variant]
    model = family_model(family, **overrides)
    back = load_any(export_gguf(model, tmp_path / "m.gguf", "F32"))
    assert torch.equal(logits(back, ids), logits(model, ids))
    rope = lambda c: c.rope_parameters.get("full_attention", c.rope_parameters)  # noqa: E731
    assert rope(back.config) == rope(model.config)
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert getattr(back.config, "final_logit_softcapping", None) == getattr(model.config, "final_logit_softcapping",
                                                                             None)


@pytest.mark.parametrize("recipe,name", [("gguf_q4_0", "Q4_0"), ("gguf_q8_0", "Q8_0")])
def test_gguf_format_exact_export_equals_fake_quant(fam, ids, tmp_path, recipe, name):
    family, model = fam
    prepared = qat.prepare(model, qat.load_recipe(recipe))
    ref = logits(prepared, ids)
    path = export_gguf(prepared, tmp_path / "m.gguf", "F32")  # quantized layers keep their trained type
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    attn = "attn_qkv" if family == "phi3" else "attn_q"
    assert types[f"blk.0.{attn}.weight"] == types["blk.1.ffn_down.weight"] == name
    assert torch.equal(logits(load_any(path), ids), ref)


def test_tiny_model_names_the_families():
    with pytest.raises(ValueError, match="model_type='gpt2'; choose from \\['gemma3_text', 'llama'"):
        tiny_model("gpt2")


def test_family_config_the_gguf_file_cannot_describe_is_refused(tmp_path):
    qwen = tiny_model("qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, use_sliding_window=True,
                      sliding_window=16, max_window_layers=0)
    with pytest.raises(ValueError, match="use_sliding_window=True.*llama.cpp's qwen2 architecture does not run"):
        export_gguf(qwen, tmp_path / "q.gguf", "F32")
    phi = tiny_model("phi3", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=1,
                     rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                                      "long_factor": [1.0] * 8, "original_max_position_embeddings": 32},
                     max_position_embeddings=64)
    with pytest.raises(ValueError, match="rope_type='longrope'.*supported: \\['default'\\]"):
        export_gguf(phi, tmp_path / "p.gguf", "F32")
    gemma = tiny_model("gemma3_text", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=1,
                       query_pre_attn_scalar=64)
    with pytest.raises(ValueError, match="query_pre_attn_scalar=64; the file needs 16"):
        export_gguf(gemma, tmp_path / "g.gguf", "F32")
    assert not list(tmp_path.iterdir())


def test_export_and_eval_jobs_take_a_gemma3_folder_and_its_gguf(tmp_path):
    """The jobs behind qat-export format=gguf and qat-eval model.path=<.gguf> on a Gemma 3 checkpoint folder
    (both refused it before the adapters): the file's perplexity is the folder's."""
    from qat.jobs.eval import run_eval
    from qat.jobs.export import run_export
    from qat.recipes import CONFIG_DIR
    from tests.export.test_gguf_file import bpe_tokenizer

    model = tiny_model("gemma3_text", vocab_size=320, hidden_size=64, intermediate_size=128, vector_noise=0.1)
    model.save_pretrained(tmp_path / "g3")
    bpe_tokenizer().save_pretrained(tmp_path / "g3")
    out = run_export(str(tmp_path / "g3"), str(tmp_path / "g3.gguf"), format="gguf", gguf_type="F32")
    corpus = str(CONFIG_DIR / "data" / "tiny_corpus.txt")
    ppl = [run_eval(m, data=corpus, seq_len=32, max_blocks=2, tokenizer=str(tmp_path / "g3"), prompt=None)["ppl"]
           for m in (str(tmp_path / "g3"), out["output"])]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)
