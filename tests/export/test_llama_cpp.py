"""llama.cpp runs our GGUF files: it loads them, its next-token log-probs and perplexity match qat's loader on
the same tokens, and its tokenizer (from our embedded vocabulary) gives transformers' ids.

Needs llama.cpp's `llama-perplexity` / `llama-tokenize` binaries: set QAT_LLAMA_CPP to a build folder (or
put them on PATH). Without them those tests are skipped (CI has none); see docs/export.md. The metadata
llama.cpp needs (pre-tokenizer name, token list padded to vocab_size) is checked without it.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_llama_cpp", ROOT / "scripts" / "check_llama_cpp.py")
check = sys.modules.setdefault("check_llama_cpp", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(check)

BIN = check.find_llama_cpp()
needs_llama_cpp = pytest.mark.skipif(
    BIN is None, reason="llama.cpp not found: set QAT_LLAMA_CPP to a llama.cpp build folder (with bin/llama-perplexity)"
                        " or put llama-perplexity on PATH")
TEXT = (ROOT / "configs" / "data" / "tiny_corpus.txt").read_text()
N_CTX, CHUNKS = 64, 2


@pytest.fixture(scope="module")
def tiny():
    return check.tiny_model_and_tokenizer(TEXT)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


# Bounds measured on this tiny random model (see docs/export.md for the numbers): llama.cpp rounds
# activations to 8 bits in its quantized dot products and keeps F16 weights' products in F16, so the
# log-probs are close, not equal.
BOUNDS = {"F32": (1e-3, 1e-3), "F16": (1e-2, 1e-2), "Q8_0": (2e-2, 1e-2), "Q4_K_M": (5e-2, 2e-2), "Q4_0": (5e-2, 2e-2),
          "IQ4_NL": (5e-2, 2e-2)}


@needs_llama_cpp
@pytest.mark.parametrize("gguf_type", list(BOUNDS))
def test_llama_cpp_matches_our_loader(tiny, text_file, tmp_path, gguf_type):
    from qat.export import export_gguf, load_any

    model, tok = tiny
    path = export_gguf(model, tmp_path / f"t-{gguf_type}.gguf", gguf_type, tokenizer=tok)
    ref = check.llama_perplexity(BIN, path, text_file, N_CTX, CHUNKS, tmp_path)
    assert ref.tokens.shape == (CHUNKS, N_CTX) and ref.n_vocab == model.config.vocab_size
    res = check.compare(load_any(path), ref)
    max_bound, ppl_bound = BOUNDS[gguf_type]
    assert res["max_abs"] < max_bound, res
    assert abs(res["ppl"] / ref.ppl - 1) < ppl_bound, (res, ref.ppl)
    assert res["top1"] > 0.9, res


@needs_llama_cpp
@pytest.mark.parametrize("recipe", ["gguf_iq4_nl", "gguf_q4_k"])
def test_llama_cpp_runs_the_fake_quant_model(tiny, text_file, tmp_path, recipe):
    """A model prepared with a GGUF recipe, exported as it stands (quantized layers keep their trained type),
    computes in llama.cpp what the fake-quant model computes, up to llama.cpp's 8-bit activations."""
    import copy

    import gguf

    import qat
    from qat.export import export_gguf

    model, tok = tiny
    prepared = qat.prepare(copy.deepcopy(model), qat.load_recipe(recipe))
    path = export_gguf(prepared, tmp_path / f"{recipe}.gguf", "F32", tokenizer=tok)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    expect = {"gguf_iq4_nl": "IQ4_NL", "gguf_q4_k": "Q4_K"}[recipe]
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == expect, types
    ref = check.llama_perplexity(BIN, path, text_file, N_CTX, CHUNKS, tmp_path)
    res = check.compare(prepared.eval(), ref)
    assert res["max_abs"] < 5e-2, res
    assert abs(res["ppl"] / ref.ppl - 1) < 2e-2, (res, ref.ppl)
    assert res["top1"] > 0.9, res


@needs_llama_cpp
def test_llama_cpp_tokenizes_as_transformers(tiny, tmp_path):
    from qat.export import export_gguf

    model, tok = tiny
    path = export_gguf(model, tmp_path / "t.gguf", "Q8_0", tokenizer=tok)
    for text in ("the quick brown fox", "Hello, world! (it's 2024)", "  spaces,\tand\nnew lines ... 3.14159"):
        assert check.llama_tokenize(BIN, path, text, tmp_path) == tok(text, add_special_tokens=False)["input_ids"], text


def test_pre_tokenizer_gets_llama_cpps_name(caplog):
    from tokenizers import pre_tokenizers as pt

    from qat.export.gguf_vocab import llama_cpp_pre

    state = lambda p: json.loads(p.__getstate__())  # noqa: E731
    assert llama_cpp_pre(state(pt.ByteLevel(add_prefix_space=False))) == "gpt-2"
    smollm = pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)])
    assert llama_cpp_pre(state(smollm)) == "smollm"
    assert llama_cpp_pre(state(pt.Whitespace())) == "default"
    assert "no known llama.cpp name" in caplog.text


@needs_llama_cpp
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_0", "Q5_1", "Q6_K", "Q4_K_M", "Q5_K_S"])
def test_tensor_types_equal_llama_quantize(tiny, tmp_path, gguf_type, tied):
    """Our per-tensor type rules are llama-quantize's: the same F32 file quantized by llama.cpp has the same
    type for every tensor as our export of the model."""
    import copy
    import subprocess

    import gguf

    from qat.export import export_gguf

    model, tok = tiny
    if tied:
        model = copy.deepcopy(model)
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    ours = export_gguf(model, tmp_path / f"ours-{gguf_type}.gguf", gguf_type, tokenizer=tok)
    f32 = export_gguf(model, tmp_path / "f32.gguf", "F32", tokenizer=tok)
    theirs = tmp_path / f"theirs-{gguf_type}.gguf"
    proc = subprocess.run([str(BIN / "llama-quantize"), str(f32), str(theirs), gguf_type, "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    def types(path):
        return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}

    assert types(ours) == types(theirs)
    # llama-quantize copied our qat.sha256 along; its new tensor table means the key does not apply there
    from qat.export import load_any

    assert load_any(theirs).lm_head.weight.isfinite().all()

@pytest.mark.parametrize("llama_cpp", [False, pytest.param(True, marks=needs_llama_cpp)], ids=["metadata", "llama.cpp"])
def test_token_list_padded_to_vocab_size(tmp_path, llama_cpp):
    import gguf

    from qat.export import export_gguf
    from tests.export.test_gguf_file import bpe_tokenizer

    model, _ = check.tiny_model_and_tokenizer(TEXT)
    tok = bpe_tokenizer()  # 300 tokens for a 320-row embedding: llama.cpp sizes token_embd by the token list
    path = export_gguf(model, tmp_path / "t.gguf", "Q8_0", tokenizer=tok)
    fields = gguf.GGUFReader(str(path)).fields
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 320
    assert fields["tokenizer.ggml.token_type"].contents()[300:] == [gguf.TokenType.UNUSED] * 20
    if llama_cpp:
        text = tmp_path / "text.txt"
        text.write_text(TEXT)
        assert check.llama_perplexity(BIN, path, text, N_CTX, 1, tmp_path).n_vocab == 320


def test_tokenizer_larger_than_the_model_is_refused(tmp_path):
    from qat.export import export_gguf

    model, tok = check.tiny_model_and_tokenizer(TEXT, vocab_size=320)
    model.resize_token_embeddings(256)
    with pytest.raises(ValueError, match="320 tokens but the model's vocab_size is 256"):
        export_gguf(model, tmp_path / "t.gguf", "Q8_0", tokenizer=tok)
