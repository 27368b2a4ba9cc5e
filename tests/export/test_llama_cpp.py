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
          "IQ4_NL": (5e-2, 2e-2), "IQ4_XS": (5e-2, 2e-2), "MXFP4": (5e-2, 2e-2), "NVFP4": (5e-2, 2e-2), "TQ1_0": (5e-2, 2e-2),
          "TQ2_0": (5e-2, 2e-2)}


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
@pytest.mark.parametrize("recipe", ["gguf_iq4_nl", "gguf_iq4_xs", "gguf_q4_k", "mxfp4", "nvfp4_w4a16"])
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
    expect = {"gguf_iq4_nl": "IQ4_NL", "gguf_iq4_xs": "IQ4_XS", "gguf_q4_k": "Q4_K", "mxfp4": "MXFP4",
              "nvfp4_w4a16": "NVFP4"}[recipe]
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == expect, types
    ref = check.llama_perplexity(BIN, path, text_file, N_CTX, CHUNKS, tmp_path)
    res = check.compare(prepared.eval(), ref)
    assert res["max_abs"] < 5e-2, res
    assert abs(res["ppl"] / ref.ppl - 1) < 2e-2, (res, ref.ppl)
    assert res["top1"] > 0.9, res


@needs_llama_cpp
@pytest.mark.parametrize("recipe, narrow, wide", [("gguf_tq2_0_lsq", "Q4_0", "TQ2_0"),
                                                  ("gguf_iq4_xs_lsq", "IQ4_NL", "IQ4_XS"), ("gguf_q4_k", "Q5_0", "Q4_K")])
def test_llama_cpp_runs_a_gguf_fallback_model(tiny, text_file, tmp_path, recipe, narrow, wide):
    """Recipe key gguf_fallback on a model whose hidden rows (128) a super-block cannot hold: those layers trained
    on the fallback type, the 256-wide ffn_down on the recipe's, and llama.cpp computes what the fake-quant model
    computes, up to its 8-bit activations."""
    import gguf

    import qat
    from qat.export import export_gguf
    from qat.testing import tiny_llama

    _, tok = tiny
    model = tiny_llama(vocab_size=320, hidden_size=128, intermediate_size=256, max_position_embeddings=256)
    prepared = qat.prepare(model, {**qat.recipes.read_recipe(recipe), "gguf_fallback": True})
    path = export_gguf(prepared, tmp_path / f"{recipe}.gguf", "F32", tokenizer=tok)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == narrow, types
    assert types["blk.1.ffn_down.weight"] == wide, types
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


FAMILIES = ["qwen2", "qwen3", "gemma3_text", "phi3"]  # Llama: the tests above
# The Llama bounds, but Q8_0's max |dlp| for Gemma 3 measured 0.029 (qwen2 0.013, qwen3 0.018, phi3 0.017): its
# embeddings are scaled by sqrt(hidden) and each layer has four norms, and llama.cpp rounds activations to 8 bits
FAMILY_BOUNDS = {**BOUNDS, "Q8_0": (4e-2, 1e-2)}


@pytest.fixture(scope="module", params=FAMILIES)
def family_tiny(request):
    return request.param, *check.tiny_model_and_tokenizer(TEXT, model_type=request.param)


@needs_llama_cpp
@pytest.mark.parametrize("gguf_type", ["F32", "Q8_0", "Q4_K_M"])
def test_llama_cpp_runs_every_family_as_our_loader_does(family_tiny, text_file, tmp_path, gguf_type):
    """Each family's file (its GGUF architecture, tensor transforms and metadata: Gemma 3's +1 norms and sliding
    layers within these 64-token chunks, Phi-3's fused tensors, Qwen's biases and q/k norms) computes in llama.cpp
    what qat's loader computes, within the Llama bounds."""
    from qat.export import export_gguf, load_any

    family, model, tok = family_tiny
    # (general.name is the file's stem: llama.cpp sets special-token attributes on models named "phi3...",
    # and fails on a vocabulary without Phi-3's "</s>", so the files here are not named after the family)
    path = export_gguf(model, tmp_path / f"tiny-{gguf_type}.gguf", gguf_type, tokenizer=tok)
    ref = check.llama_perplexity(BIN, path, text_file, N_CTX, CHUNKS, tmp_path)
    assert ref.tokens.shape == (CHUNKS, N_CTX) and ref.n_vocab == model.config.vocab_size
    res = check.compare(load_any(path), ref)
    print(family, gguf_type, f"llama.cpp {ref.ppl:.4f}", {k: round(v, 5) for k, v in res.items()})
    max_bound, ppl_bound = FAMILY_BOUNDS[gguf_type]
    assert res["max_abs"] < max_bound, res
    assert abs(res["ppl"] / ref.ppl - 1) < ppl_bound, (res, ref.ppl)
    assert res["top1"] > 0.9, res


@needs_llama_cpp
def test_llama_cpp_runs_every_familys_fake_quant_model(family_tiny, text_file, tmp_path):
    """Format-exact: a family prepared with gguf_q4_k, exported as it stands, computes in llama.cpp what the
    fake-quant model computes (up to llama.cpp's 8-bit activations)."""
    import copy

    import qat
    from qat.export import export_gguf

    family, model, tok = family_tiny
    prepared = qat.prepare(copy.deepcopy(model), qat.load_recipe("gguf_q4_k"))
    path = export_gguf(prepared, tmp_path / "tiny-q4_k.gguf", "F32", tokenizer=tok)
    ref = check.llama_perplexity(BIN, path, text_file, N_CTX, CHUNKS, tmp_path)
    res = check.compare(prepared.eval(), ref)
    print(family, "gguf_q4_k", f"llama.cpp {ref.ppl:.4f}", {k: round(v, 5) for k, v in res.items()})
    assert res["max_abs"] < 5e-2, res
    assert abs(res["ppl"] / ref.ppl - 1) < 2e-2, (res, ref.ppl)
    assert res["top1"] > 0.9, res


@needs_llama_cpp
@pytest.mark.parametrize("gguf_type", ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q4_0"])
def test_every_familys_tensor_types_equal_llama_quantize(family_tiny, tmp_path, gguf_type):
    """llama.cpp's per-tensor rules for these architectures (Phi-3's fused attn_qkv counts as attn_v, Gemma 3's
    tied embeddings take the output type) are ours."""
    import subprocess

    import gguf

    from qat.export import export_gguf

    family, model, tok = family_tiny
    ours = export_gguf(model, tmp_path / f"ours-{gguf_type}.gguf", gguf_type, tokenizer=tok)
    f32 = export_gguf(model, tmp_path / "f32.gguf", "F32", tokenizer=tok)
    theirs = tmp_path / f"theirs-{gguf_type}.gguf"
    proc = subprocess.run([str(BIN / "llama-quantize"), str(f32), str(theirs), gguf_type, "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    def types(path):
        return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}

    assert types(ours) == types(theirs)


def qwen2_style_tokenizer(vocab_size: int = 320):
    """A byte-level BPE with Qwen2's pre-tokenizer (its Split regex, single digits, then a regex-free ByteLevel)."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    split = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+"
             "|\\s+(?!\\S)|\\s+")  # Qwen2's tokenizer.json
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([TEXT], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>",
                                                eos_token="<|endoftext|>")


@pytest.mark.parametrize("llama_cpp", [False, pytest.param(True, marks=needs_llama_cpp)], ids=["metadata", "llama.cpp"])
def test_qwen2_pre_tokenizer_is_named_and_tokenizes_as_transformers(tmp_path, llama_cpp):
    import gguf

    from qat.export import export_gguf
    from qat.testing import tiny_model

    tok = qwen2_style_tokenizer()
    model = tiny_model("qwen2", vocab_size=320, hidden_size=64, intermediate_size=128)
    path = export_gguf(model, tmp_path / "q.gguf", "Q8_0", tokenizer=tok)
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents() == "qwen2"
    if llama_cpp:
        for text in ("the year 2024 had 366 days", "Hello, world! (it's 3.14159)", "  spaces,\tand\nnew lines"):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert check.llama_tokenize(BIN, path, text, tmp_path) == ids, text


@needs_llama_cpp
@pytest.mark.parametrize("variant", ["gemma3_softcap_linear_rope", "phi3_partial_rotary", "qwen2_tied", "qwen3_tied",
                                     "llama3_rope", "llama_linear_rope"])
def test_llama_cpp_runs_config_variants(text_file, tmp_path, variant):
    """The metadata of the variants (linear rope on Gemma's global layers, soft-capping, partial rotary, tying)
    means in llama.cpp what the config means in transformers (F32: only summation order differs)."""
    from qat.export import export_gguf, load_any
    from qat.testing import VARIANTS, tiny_model

    family, overrides = VARIANTS[variant]
    _, tok = check.tiny_model_and_tokenizer(TEXT, model_type="llama")
    model = tiny_model(family, vocab_size=320, hidden_size=256, intermediate_size=512, max_position_embeddings=256,
                       vector_noise=0.1, **overrides)
    path = export_gguf(model, tmp_path / "tiny-F32.gguf", "F32", tokenizer=tok)
    ref = check.llama_perplexity(BIN, path, text_file, N_CTX, CHUNKS, tmp_path)
    res = check.compare(load_any(path), ref)
    print(variant, f"llama.cpp {ref.ppl:.4f}", {k: round(v, 5) for k, v in res.items()})
    assert res["max_abs"] < 1e-3 and abs(res["ppl"] / ref.ppl - 1) < 1e-3 and res["top1"] > 0.9, res


SRC = check.llama_cpp_source(BIN) if BIN is not None else None
needs_converter = pytest.mark.skipif(SRC is None, reason="llama.cpp's convert_hf_to_gguf.py not found beside the "
                                                         "QAT_LLAMA_CPP build (CMakeCache.txt's source folder)")


CONVERTED = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gemma3_softcap_linear_rope",
             "phi3_partial_rotary", "qwen3_tied", "llama3_rope", "llama_linear_rope"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{case: (model, tokenizer, folder)} with llama.cpp's converter's F32 file at folder/theirs.gguf (one
    converter process for all: its imports take most of the time)."""
    from qat.testing import VARIANTS, tiny_model

    _, tok = check.tiny_model_and_tokenizer(TEXT, model_type="llama")
    out = {}
    for case in CONVERTED:
        family, overrides = VARIANTS.get(case, (case, {}))
        if family == "gemma3_text":  # the converter writes no layer pattern: llama.cpp takes Gemma 3's, 5 + 1
            overrides = {**overrides, "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}
        model = tiny_model(family, vocab_size=320, hidden_size=256, intermediate_size=512, max_position_embeddings=256,
                           num_layers=6 if family == "gemma3_text" else 2, vector_noise=0.1, **overrides)
        folder = tmp_path_factory.mktemp(case)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[case] = (model, tok, folder)
    check.convert_hf_to_gguf(SRC, [(folder, folder / "theirs.gguf") for _, _, folder in out.values()])
    return out


@needs_converter
@pytest.mark.parametrize("case", CONVERTED)
def test_our_f32_file_is_llama_cpps_converter_output_and_we_read_its_files(converted, tmp_path, case):
    """Tensor for tensor (names, shapes, bytes) our F32 export is what llama.cpp's convert_hf_to_gguf.py writes for
    the same folder (q/k permutation, Gemma's norm + 1, Phi-3's fused tensors, all of it), its metadata is ours but
    for keys we add (vocab_size, Gemma's per-layer sliding pattern; llama.cpp's Llama adds key/value_length), and
    load_any reads the converter's file with the model's logits."""
    import gguf
    import numpy as np
    import torch

    from qat.export import export_gguf, load_any

    model, tok, folder = converted[case]
    theirs = folder / "theirs.gguf"
    ours = export_gguf(model, tmp_path / "ours.gguf", "F32", tokenizer=tok)
    r_ours, r_theirs = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(theirs))
    t_ours = {t.name: np.array(t.data) for t in r_ours.tensors}
    t_theirs = {t.name: np.array(t.data) for t in r_theirs.tensors}
    assert sorted(t_ours) == sorted(t_theirs)
    assert [n for n in t_ours if not np.array_equal(t_ours[n], t_theirs[n])] == []

    def keys(reader):
        return {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("GGUF.", "general.", "tokenizer."))}

    k_ours, k_theirs = keys(r_ours), keys(r_theirs)
    arch = r_ours.fields["general.architecture"].contents()
    ours_only = {f"{arch}.vocab_size", f"{arch}.attention.sliding_window_pattern", "qat.sha256"}  # sha256: load checks
    theirs_only = {f"{arch}.attention.key_length", f"{arch}.attention.value_length"} if arch == "llama" else set()
    assert set(k_ours) - set(k_theirs) <= ours_only and set(k_theirs) - set(k_ours) <= theirs_only
    assert {k: v for k, v in k_ours.items() if k in k_theirs} == {k: v for k, v in k_theirs.items() if k in k_ours}
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_any(theirs)(ids).logits, model(ids).logits)
