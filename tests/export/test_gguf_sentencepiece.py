"""SentencePiece-style tokenizers (Llama 2 / Mistral / Gemma / Phi-3: BPE with byte fallback, and Unigram) are
embedded in GGUF as llama.cpp's converter writes them (tokenizer.ggml.model "llama", scores, token types), read
from tokenizer.json; where llama.cpp is built (QAT_LLAMA_CPP), llama-tokenize gives transformers' ids."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import gguf
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from qat.export import export_gguf
from qat.export.gguf_vocab import add_space_prefix, is_sentencepiece
from qat.testing import tiny_llama

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_llama_cpp", ROOT / "scripts" / "check_llama_cpp.py")
check = sys.modules.setdefault("check_llama_cpp", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(check)
BIN = check.find_llama_cpp()
needs_llama_cpp = pytest.mark.skipif(BIN is None, reason="llama.cpp not found: set QAT_LLAMA_CPP to a build folder")
TEXT = (ROOT / "configs" / "data" / "tiny_corpus.txt").read_text()
SPECIAL = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{i:02X}>" for i in range(256)]
STRINGS = ["The river followed the old road north.", "Hello, world! (it's 3.14159) ünïcode 日本語",
           "  spaces,\tand\nnew lines", "a"]


def llama2_tokenizer(vocab_size: int = 600):
    """Llama 2's layout, trained here: <unk> <s> </s>, 256 byte pieces, then BPE pieces; "▁" prepended and for
    spaces (normalizer), byte fallback, BOS added."""
    trainer_tk = Tokenizer(models.BPE())
    trainer_tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer_tk.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=vocab_size - 259, show_progress=False))
    trained = json.loads(trainer_tk.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SPECIAL + BYTES)}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def unigram_tokenizer(vocab_size: int = 400):
    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.train_from_iterator([TEXT], trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                           unk_token="<unk>", show_progress=False))
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def fields_of(path):
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def llama2():
    return llama2_tokenizer()


@pytest.mark.parametrize("llama_cpp", [False, pytest.param(True, marks=needs_llama_cpp)], ids=["metadata", "llama.cpp"])
def test_byte_fallback_bpe_written_as_sentencepiece(llama2, tmp_path, llama_cpp):
    tok = llama2
    spec = json.loads(tok.backend_tokenizer.to_str())
    assert is_sentencepiece(spec["model"]) and add_space_prefix(spec)
    path = export_gguf(tiny_llama(vocab_size=640), tmp_path / "spm.gguf", "F32", tokenizer=tok)
    f = fields_of(path)
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.pre"] == "default"
    tokens, scores, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(scores) == len(types) == 640  # padded to vocab_size, as the converter does
    assert tokens[:3] == SPECIAL and tokens[3:259] == BYTES and tokens[600:] == [f"[PAD{i}]" for i in range(600, 640)]
    T = gguf.TokenType
    assert types[0] == T.UNKNOWN and types[1:3] == [T.CONTROL] * 2 and set(types[3:259]) == {T.BYTE}
    assert set(types[259:600]) == {T.NORMAL} and set(types[600:]) == {T.UNUSED}
    # a merged piece scores -(its merge's rank): llama.cpp merges the best-scored pair first, i.e. in merge order
    merges = spec["model"]["merges"]
    first = "".join(merges[0].split(" ") if isinstance(merges[0], str) else merges[0])
    assert scores[tok.convert_tokens_to_ids(first)] == 0.0
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.eos_token_id"] == 2
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.ggml.add_space_prefix"] is True
    if llama_cpp:
        for text in STRINGS:
            assert check.llama_tokenize(BIN, path, text, tmp_path) == tok(text)["input_ids"], text


def test_unigram_written_with_its_log_probabilities(tmp_path, caplog):
    tok = unigram_tokenizer()
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    path = export_gguf(tiny_llama(vocab_size=512), tmp_path / "uni.gguf", "F32", tokenizer=tok)
    f = fields_of(path)
    assert f["tokenizer.ggml.model"] == "llama" and "greedily" in caplog.text
    n = len(model["vocab"])
    assert f["tokenizer.ggml.tokens"][:n] == [p for p, _ in model["vocab"]]
    special = {tok.convert_tokens_to_ids(t) for t in SPECIAL}
    assert all(abs(f["tokenizer.ggml.scores"][i] - s) < 1e-6 for i, (_, s) in enumerate(model["vocab"])
               if i not in special)
    assert f["tokenizer.ggml.token_type"][model["unk_id"]] == gguf.TokenType.UNKNOWN
    assert f["tokenizer.ggml.add_space_prefix"] is True and f["tokenizer.ggml.add_bos_token"] is False


def test_added_tokens_are_user_defined_or_control(tmp_path):
    tok = llama2_tokenizer()
    tok.add_tokens(["▁qat▁word"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    path = export_gguf(tiny_llama(vocab_size=640), tmp_path / "added.gguf", "F32", tokenizer=tok)
    f = fields_of(path)
    user, control = tok.convert_tokens_to_ids("▁qat▁word"), tok.convert_tokens_to_ids("<|im_end|>")
    assert f["tokenizer.ggml.tokens"][user] == " qat word"  # the converter writes a user token's "▁" as spaces
    assert f["tokenizer.ggml.token_type"][user] == gguf.TokenType.USER_DEFINED
    assert f["tokenizer.ggml.token_type"][control] == gguf.TokenType.CONTROL
    assert f["tokenizer.ggml.scores"][user] == f["tokenizer.ggml.scores"][control] == -1000.0


class _FakeProcessor:
    """The SentencePieceProcessor calls the converter makes, over a fixed vocabulary (the sentencepiece package
    is not installed here)."""
    PIECES = [("<unk>", 0.0, "unk"), ("<s>", 0.0, "control"), ("</s>", 0.0, "control"), ("<0x41>", 0.0, "byte"),
              ("▁a", -1.0, ""), ("b", -2.0, ""), ("<unused>", 0.0, "unused")]

    def vocab_size(self):
        return len(self.PIECES)

    def IdToPiece(self, i):  # noqa: N802 - sentencepiece's names
        return self.PIECES[i][0]

    def GetScore(self, i):  # noqa: N802
        return self.PIECES[i][1]

    def IsUnknown(self, i):  # noqa: N802
        return self.PIECES[i][2] == "unk"

    def IsControl(self, i):  # noqa: N802
        return self.PIECES[i][2] == "control"

    def IsUnused(self, i):  # noqa: N802
        return self.PIECES[i][2] == "unused"

    def IsByte(self, i):  # noqa: N802
        return self.PIECES[i][2] == "byte"


class _SentencePieceTokenizer:
    """A tokenizer backed by sentencepiece (tokenizer.model), no tokenizer.json."""
    sp_model = _FakeProcessor()
    bos_token_id, eos_token_id, unk_token_id, pad_token_id, chat_template = 1, 2, 0, None, None
    added_tokens_decoder: dict = {}

    def get_vocab(self):
        return {p: i for i, (p, _, _) in enumerate(self.sp_model.PIECES)}

    def __call__(self, text):
        return {"input_ids": [1, 4]}


def test_sentencepiece_model_read_as_the_converter_reads_it(tmp_path):
    path = export_gguf(tiny_llama(vocab_size=16), tmp_path / "sp.gguf", "F32", tokenizer=_SentencePieceTokenizer())
    f = fields_of(path)
    T = gguf.TokenType
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.ggml.tokens"][:7] == [p for p, _, _ in _FakeProcessor.PIECES]
    assert f["tokenizer.ggml.scores"][:7] == [s for _, s, _ in _FakeProcessor.PIECES]
    assert f["tokenizer.ggml.token_type"] == [T.UNKNOWN, T.CONTROL, T.CONTROL, T.BYTE, T.NORMAL, T.NORMAL,
                                              T.UNUSED] + [T.UNUSED] * 9
