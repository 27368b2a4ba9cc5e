"""Architecture adapters: GGUF names from gguf-py's TensorNameMap equal the hand-written map they replaced;
an unknown family is refused naming the known ones and the file to add; Mistral is written as llama."""
from __future__ import annotations

import re

import pytest
import torch
import transformers

import qat.arch
from qat.arch import get_arch, registered_archs
from qat.export.gguf_export import export_gguf
from qat.export.gguf_import import load_gguf, open_gguf

# the hand-written Llama map qat used before the adapters (qat/export/gguf_export.py, _LAYER_MAP / _TOP_MAP)
OLD_LAYER_MAP = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
OLD_TOP_MAP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def old_gguf_name(hf_name: str) -> str:
    module, _, leaf = hf_name.rpartition(".")
    if module in OLD_TOP_MAP:
        return f"{OLD_TOP_MAP[module]}.{leaf}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    return f"blk.{m.group(1)}.{OLD_LAYER_MAP[m.group(2)]}.{leaf}"


def tiny(cls=transformers.LlamaForCausalLM, config=transformers.LlamaConfig, **kw):
    torch.manual_seed(0)
    return cls(config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, **kw)).eval()


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_tensor_names_equal_the_old_hand_written_map(family):
    model = tiny() if family == "llama" else tiny(transformers.MistralForCausalLM, transformers.MistralConfig)
    adapter = get_arch(model)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == 3 * 9 + 3
    assert {n: adapter.gguf_name(n, 3) for n in names} == {n: old_gguf_name(n) for n in names}
    assert adapter.hf_names(names, 3) == {old_gguf_name(n): n for n in names}  # the importer's inverse


def test_unknown_family_names_the_known_ones_and_the_file_to_add(tmp_path):
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported; known: \[[^]]+\]; "
                                         r"add an adapter in qat/arch/gpt2\.py") as err:
        get_arch(transformers.GPT2Config())
    assert f"known: {registered_archs()}" in str(err.value)
    assert all(repr(f) in str(err.value) for f in ("gemma3_text", "llama", "mistral", "phi3", "qwen2", "qwen3"))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"GGUF export: architecture 'gpt2' is not supported.*qat/arch/gpt2\.py"):
        export_gguf(gpt2, tmp_path / "g.gguf", "F32")
    with pytest.raises(ValueError, match="architecture None is not supported"):
        get_arch(torch.nn.Linear(2, 2))


def test_registry_and_mappings():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "qwen3_moe", "mixtral", "olmoe"} <= set(registered_archs())
    llama, mistral = get_arch("llama"), get_arch("mistral")
    assert mistral.mappings == llama.mappings and mistral.gguf_arch_name == llama.gguf_arch_name == "llama"
    assert [m.prev for m in llama.mappings] == ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm",
                                                "mlp.up_proj"]
    assert [m.prev for m in llama.smooth_mappings] == ["input_layernorm", "post_attention_layernorm"]
    assert qat.arch.gguf_reader_arch("llama") is llama and qat.arch.gguf_reader_arch("gpt2") is None
    with pytest.raises(ValueError, match="registered twice"):
        @qat.arch.register_arch
        class Again(qat.arch.ArchAdapter):
            model_types = ("llama",)


def test_mistral_is_written_as_llama_and_reads_back_as_llama(tmp_path):
    model = tiny(transformers.MistralForCausalLM, transformers.MistralConfig)
    path = export_gguf(model, tmp_path / "m.gguf", "F32")
    assert open_gguf(path).fields["general.architecture"].contents() == "llama"
    back = load_gguf(path)
    assert isinstance(back, transformers.LlamaForCausalLM)
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope, head_dim", [
    ({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
      "rope_theta": 500000.0}, 128),  # Llama 3.1 / 3.2
    ({"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
      "rope_theta": 500000.0}, 64),  # Llama 3.2 1B
    ({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
      "rope_theta": 10000.0}, 32),
])
def test_llama3_rope_factors_invert_to_the_same_parameters(rope, head_dim):
    from qat.arch.llama import llama3_rope_factors, llama3_rope_parameters

    factors = llama3_rope_factors(rope, head_dim)
    assert factors.min() == 1 and factors.max() == rope["factor"] and (factors[1:] >= factors[:-1]).all()
    assert llama3_rope_parameters(factors, rope["rope_theta"], head_dim) == {"rope_type": "llama3", **rope}


@pytest.mark.parametrize("old_context, high, smoothed", [(10, 1.5, 0), (16, 1.5, 1), (64, 4.0, 3)])
def test_llama3_rope_parameters_give_the_files_factors(old_context, high, smoothed):
    from qat.arch.llama import llama3_rope_factors, llama3_rope_parameters

    rope = {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": high, "original_max_position_embeddings":
            old_context, "rope_theta": 100.0}
    factors = llama3_rope_factors(rope, 16)
    assert int(((factors > 1) & (factors < 4)).sum()) == smoothed
    back = llama3_rope_parameters(factors, 100.0, 16)
    assert torch.allclose(llama3_rope_factors(back, 16), factors, rtol=1e-5)
    assert llama3_rope_parameters(torch.ones(8), 100.0, 16) is None
    with pytest.raises(ValueError, match="not the factors of a llama3 rope"):
        llama3_rope_parameters(torch.tensor([1.0, 3.0, 2.0, 4.0]), 100.0, 8)
