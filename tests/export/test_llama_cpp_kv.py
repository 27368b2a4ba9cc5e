"""qat's KV-cache scheme with llama.cpp's K/V rotation computes what llama.cpp computes with a quantized cache:
llama-perplexity with `-ctk/-ctv q8_0` and `q4_0` (flash attention on: llama.cpp needs it for a quantized V
cache), rotation on (its default for head sizes that are multiples of 64) and off (LLAMA_ATTN_ROT_DISABLE=1),
against the float model prepared with the matching KV scheme. Skipped without llama.cpp (QAT_LLAMA_CPP)."""
from __future__ import annotations

import copy

import pytest
import torch

import qat
from qat.modules.rotation import llama_cpp_kv_blocks
from tests.export.test_llama_cpp import BIN, BOUNDS, CHUNKS, N_CTX, TEXT, check, needs_llama_cpp

CACHE_BITS = {"q8_0": 8, "q4_0": 4}


def kv_recipe(cache: str, rotate: bool) -> dict:
    """llama.cpp's cache type as a qat KV scheme (its blocks of 32 with an fp16 scale, per token and head),
    with its rotation or without."""
    kv = {"bits": CACHE_BITS[cache], "granularity": "per_group", "group_size": 32, "scale_dtype": "fp16",
          "grid": "ggml", "dynamic": True}
    return {"kv_cache": kv, "rotations": {"kv_cache": "llama_cpp"} if rotate else None}


def test_rotation_sizes_are_llama_cpps():
    """build_input_k_rot: the largest power of two >= 64 dividing the K head size; build_input_v_rot: 64; none
    unless the head size is a multiple of 64."""
    assert llama_cpp_kv_blocks(64, 64) == (64, 64)
    assert llama_cpp_kv_blocks(128, 128) == (128, 64)
    assert llama_cpp_kv_blocks(192, 192) == (64, 64)
    assert llama_cpp_kv_blocks(256, 256) == (256, 64)
    assert llama_cpp_kv_blocks(80, 80) == (0, 0)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from qat.export import export_gguf

    work = tmp_path_factory.mktemp("kv")
    model, tok = check.tiny_model_and_tokenizer(TEXT)  # head size 64: llama.cpp rotates its cache
    text = work / "text.txt"
    text.write_text(TEXT)
    return model, export_gguf(model, work / "f32.gguf", "F32", tokenizer=tok), text, work


@needs_llama_cpp
@pytest.mark.parametrize("rotate", [True, False], ids=["rotated", "LLAMA_ATTN_ROT_DISABLE"])
@pytest.mark.parametrize("cache", list(CACHE_BITS))
def test_llama_cpp_quantized_kv_cache_matches_the_kv_scheme(tiny_gguf, cache, rotate):
    model, path, text, work = tiny_gguf
    ref = check.llama_perplexity(BIN, path, text, N_CTX, CHUNKS, work, extra=["-ctk", cache, "-ctv", cache, "-fa", "on"],
                                 env=None if rotate else {"LLAMA_ATTN_ROT_DISABLE": "1"})
    with torch.no_grad():
        res = check.compare(qat.prepare(copy.deepcopy(model), kv_recipe(cache, rotate)), ref)
        other = check.compare(qat.prepare(copy.deepcopy(model), kv_recipe(cache, not rotate)), ref)
    max_bound, ppl_bound = BOUNDS[cache.upper()]  # the bounds of the weight types with the same blocks
    assert res["max_abs"] < max_bound, res
    assert abs(res["ppl"] / ref.ppl - 1) < ppl_bound, (res, ref.ppl)
    assert res["top1"] > 0.9, res
    # the rotation is what llama.cpp does: the scheme with the other choice is several times further off
    assert other["mean_abs"] > 4 * res["mean_abs"], (res, other)


# gguf_q4_0_kv_q4_0 on this model: max |dlogprob| 0.058, ppl within 0.13% (Q4_0 weights' 8-bit activations in
# llama.cpp shift keys across 4-bit cache steps): over the Q4_0 bound, so only the q8_0 cache is held to it here;
# the q4_0 cache itself is held to it above with float weights
@needs_llama_cpp
@pytest.mark.parametrize("cache", ["q8_0"])
def test_kv_qat_recipe_exports_what_llama_cpp_computes(tiny_gguf, tmp_path, cache):
    """gguf_q4_0_kv_<cache>: the prepared model (Q4_0 weights, rotated <cache> KV), exported as it stands (its
    quantized layers keep their Q4_0, the rest F32) and run by llama.cpp with that cache type, computes what the
    fake-quant model computes."""
    from qat.export import export_gguf

    model, _, text, work = tiny_gguf
    _, tok = check.tiny_model_and_tokenizer(TEXT)
    prepared = qat.prepare(copy.deepcopy(model), qat.load_recipe(f"gguf_q4_0_kv_{cache}"))
    path = export_gguf(prepared, tmp_path / "q4_0.gguf", "F32", tokenizer=tok)
    ref = check.llama_perplexity(BIN, path, text, N_CTX, CHUNKS, tmp_path, extra=["-ctk", cache, "-ctv", cache, "-fa", "on"])
    with torch.no_grad():
        res = check.compare(prepared, ref)
    max_bound, ppl_bound = BOUNDS["Q4_0"]
    assert res["max_abs"] < max_bound and abs(res["ppl"] / ref.ppl - 1) < ppl_bound and res["top1"] > 0.9, (res, ref.ppl)
