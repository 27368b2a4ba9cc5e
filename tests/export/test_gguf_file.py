"""GGUF files: llama.cpp's mix rules, transformers' GGUF loader reads our files (weights and tokenizer),
and bad input is refused with a clear error."""
from __future__ import annotations

import logging

import gguf
import pytest
import torch
import transformers

from qat.export import export_gguf, load_any, load_gguf
from qat.export.gguf_export import fit_type, mix_type
from qat.export.gguf_import import open_gguf
from qat.testing import tiny_llama
from tests.export.conftest import logits

TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny tokenizer",
        "quantization aware training for llama models"] * 20


def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TEXT, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|endoftext|>")


def test_q4_k_m_mix_follows_llama_cpp():
    n = 32
    assert mix_type("output.weight", (100, 256), "Q4_K_M", n, tied=False) == "Q6_K"
    assert mix_type("token_embd.weight", (100, 256), "Q4_K_M", n, tied=True) == "Q6_K"
    assert mix_type("token_embd.weight", (100, 256), "Q4_K_M", n, tied=False) == "Q4_K"
    more = [i for i in range(n) if mix_type(f"blk.{i}.ffn_down.weight", (8, 256), "Q4_K_M", n, False) == "Q6_K"]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert mix_type("blk.5.attn_v.weight", (8, 256), "Q4_K_M", n, False) == "Q4_K"
    assert mix_type("blk.3.attn_v.weight", (8, 256), "Q4_K_S", n, False) == "Q5_K"
    assert mix_type("blk.9.attn_q.weight", (8, 256), "Q5_K_M", n, False) == "Q5_K"
    assert mix_type("output.weight", (8, 256), "Q8_0", n, False) == "Q8_0"
    assert mix_type("blk.0.attn_norm.weight", (256,), "Q4_K_M", n, False) == "F32"



def test_legacy_file_types_follow_llama_cpp_and_pure_does_not():
    n = 16
    assert mix_type("token_embd.weight", (100, 256), "Q4_0", n, tied=True) == "Q6_K"
    assert mix_type("token_embd.weight", (100, 256), "Q4_0", n, tied=False) == "Q4_0"
    assert mix_type("output.weight", (100, 256), "Q5_1", n, tied=False) == "Q6_K"
    assert mix_type("output.weight", (100, 256), "Q5_1", n, tied=False, pure=True) == "Q5_1"
    assert mix_type("output.weight", (100, 256), "Q4_K_M", n, tied=False, pure=True) == "Q4_K"
    assert mix_type("blk.5.attn_v.weight", (8, 256), "Q4_K_M", n, False, pure=True) == "Q4_K"
    # with an imatrix, llama.cpp keeps the first n/8 ffn_down of Q4_0 / Q5_0 in Q4_1 / Q5_1
    down = [mix_type(f"blk.{i}.ffn_down.weight", (8, 256), "Q4_0", n, False, imatrix=True) for i in range(n)]
    assert down == ["Q4_1"] * 2 + ["Q4_0"] * (n - 2)
    assert mix_type("blk.0.ffn_down.weight", (8, 256), "Q5_0", n, False, imatrix=True) == "Q5_1"
    assert mix_type("blk.0.ffn_down.weight", (8, 256), "Q4_0", n, False) == "Q4_0"

def test_row_fallback_as_llama_cpp_and_said(model, tmp_path, caplog):
    assert (fit_type("Q4_K", 576), fit_type("Q6_K", 576), fit_type("Q5_K", 576), fit_type("Q4_0", 40)) == \
        ("Q5_0", "Q8_0", "Q5_1", "F16")
    # llama.cpp's tensor_type_fallback: IQ4_XS -> IQ4_NL, the ternary types -> Q4_0; MXFP4's 32-blocks fit 576
    assert [fit_type(t, 576) for t in ("IQ4_XS", "TQ2_0", "TQ1_0", "MXFP4")] == ["IQ4_NL", "Q4_0", "Q4_0", "MXFP4"]
    small = tiny_llama(vocab_size=64, hidden_size=96, intermediate_size=192, num_layers=1, num_heads=2,
                       max_position_embeddings=2048, seed=None)
    with caplog.at_level(logging.WARNING):
        path = export_gguf(small, tmp_path / "s.gguf", "Q4_K_M")
    assert "Q4_K falls back to Q5_0" in caplog.text
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["output.weight"] == "Q8_0"


@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_K_M", *[pytest.param(t, marks=pytest.mark.slow) for t in
                                                          ("Q6_K", "Q5_K_S", "Q2_K", "Q3_K", "F16", "BF16", "Q4_1", "Q5_0")]])
def test_transformers_reads_our_file_as_we_do(model, ids, tmp_path, gguf_type):
    path = export_gguf(model, tmp_path / "m.gguf", gguf_type)
    ours = logits(load_gguf(path), ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert torch.equal(logits(hf, ids), ours)
    floor = 0.6 if gguf_type in ("Q2_K", "Q3_K") else 0.8  # a sanity bound: 2-3 bit random weights lose much
    assert torch.nn.functional.cosine_similarity(ours.flatten(), logits(model, ids).flatten(), dim=0) > floor


@pytest.mark.parametrize("gguf_type,label", [("F32", "ALL_F32"), ("Q4_0", "MOSTLY_Q4_0"), ("Q4_K_M", "MOSTLY_Q4_K_M"),
                                              ("Q3_K", "MOSTLY_Q3_K_M"), ("Q4_K", "MOSTLY_Q4_K_M"), ("Q5_K", "MOSTLY_Q5_K_M")])
def test_every_type_writes_a_file_type(model, tmp_path, gguf_type, label):
    # Ollama labels a model by general.file_type ("unknown" without it); a single K type gets what
    # llama.cpp's loader guesses for a file of that type
    path = export_gguf(model, tmp_path / "m.gguf", gguf_type)
    assert gguf.LlamaFileType(gguf.GGUFReader(str(path)).fields["general.file_type"].contents()).name == label


def test_f32_round_trip_is_exact_and_metadata_is_llama(model, ids, tmp_path):
    path = export_gguf(model, tmp_path / "m.gguf", "F32")
    assert torch.equal(logits(load_any(path), ids), logits(model, ids))
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2


def test_tokenizer_embedded_and_read_back_by_transformers(model, tmp_path):
    tok = bpe_tokenizer()
    export_gguf(model, tmp_path / "m.gguf", "Q8_0", tokenizer=tok)
    back = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ("the lazy fox", "hello quantization world"):
        assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back.eos_token_id == tok.eos_token_id


def test_unknown_architecture_and_type(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported; known"):
        export_gguf(gpt2, tmp_path / "g.gguf", "Q8_0")
    llama = tiny_llama(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=2,
                       max_position_embeddings=2048, seed=None)
    with pytest.raises(ValueError, match="gguf_type='Q4_K_X'; choose a type"):
        export_gguf(llama, tmp_path / "g.gguf", "Q4_K_X")
    assert not (tmp_path / "g.gguf").exists()


def test_truncated_and_corrupted_files_are_refused(model, tmp_path):
    path = export_gguf(model, tmp_path / "m.gguf", "Q8_0")
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        open_gguf(tmp_path / "cut.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + data[4:])
    with pytest.raises(ValueError, match="corrupted GGUF"):
        load_gguf(tmp_path / "bad.gguf")


def test_unwritable_path_and_atomic_failure(model, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        export_gguf(model, blocker / "m.gguf", "Q8_0")
    import qat.export.gguf_export as ge

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ge, "encode_blocks", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(model, tmp_path / "m.gguf", "Q8_0")
    assert list(tmp_path.iterdir()) == [blocker]  # no partial file, no temp file left behind


@pytest.mark.parametrize("gguf_type", ["IQ4_NL", "IQ4_XS", "MXFP4", "TQ1_0", "TQ2_0"])
def test_llama_cpp_head_rules_for_the_newer_types(gguf_type):
    """llama-quantize keeps the output (and a tied embedding) in Q6_K for every file type but Q8_0, and the ternary
    types' untied token embedding in Q4_K: a model whose head the recipe left in float is not written ternary."""
    assert mix_type("output.weight", (512, 256), gguf_type, 4, tied=False) == "Q6_K"
    assert mix_type("token_embd.weight", (512, 256), gguf_type, 4, tied=True) == "Q6_K"
    embd = mix_type("token_embd.weight", (512, 256), gguf_type, 4, tied=False)
    assert embd == ("Q4_K" if gguf_type.startswith("TQ") else gguf_type)
    assert mix_type("blk.0.attn_q.weight", (256, 256), gguf_type, 4, tied=False) == gguf_type
    assert mix_type("output.weight", (512, 256), gguf_type, 4, tied=False, pure=True) == gguf_type
