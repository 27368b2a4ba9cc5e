"""Ollama runs our GGUF files: `ollama create` takes them, `/api/show` reports what the file says, and its
greedy text agrees with qat's loader.

Needs an `ollama` binary ($QAT_OLLAMA, or on PATH); without one those tests are skipped (CI has none). What
Ollama reads from a file (by its source: family from general.architecture, parameter count from the tensor
shapes, quantization label from general.file_type, all with strict GGUF value types in older releases) is
checked without it, and the script's server handling (loopback port, Modelfile, greedy options, stopping the
server and its runner) is checked against a small stand-in executable that is NOT Ollama.

Asserted with a real Ollama (tiny random Llama): the file loads, /api/show equals the file's fields, the first
greedy token equals qat's for every type, and for F16 the whole 8-token continuation does. Not asserted: whole
continuations of quantized types. llama.cpp (the runner Ollama uses for `llama`) rounds activations to 8 bits in
quantized dot products, so a random model's near-tied logits flip after a few tokens (measured with llama.cpp
as a proxy: Q8_0 / Q4_0 diverge from qat on 1 of 2 prompts, F32 / F16 never).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_ollama", ROOT / "scripts" / "check_ollama.py")
check = sys.modules.setdefault("check_ollama", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(check)

BIN = check.find_ollama()
needs_ollama = pytest.mark.skipif(BIN is None, reason="ollama not found: set QAT_OLLAMA to the binary or put it on PATH")
N_TOKENS = 8


@pytest.fixture(scope="module")
def tiny():
    helpers = check._llama_cpp_helpers()
    return helpers.tiny_model_and_tokenizer(helpers.default_text("tiny"))


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    from qat.export import export_gguf

    folder = tmp_path_factory.mktemp("gguf")
    model, tok = tiny
    return {t: export_gguf(model, folder / f"tiny-{t}.gguf", t, tokenizer=tok) for t in ("F16", "Q8_0", "Q4_K_M")}


@pytest.mark.parametrize("gguf_type", ["F16", "Q8_0", "Q4_K_M"])
def test_file_carries_what_ollama_reads(tiny, exported, gguf_type):
    import gguf

    model, _ = tiny
    path = exported[gguf_type]
    want = check.expected_show(path)
    assert want["family"] == "llama" and want["quantization_level"] == gguf_type
    assert want["parameter_count"] == sum(p.numel() for p in model.parameters())
    assert want["context_length"] == model.config.max_position_embeddings
    fields = gguf.GGUFReader(str(path)).fields
    # Ollama before its fs/gguf rewrite reads these with a type assertion: another width reads as 0 / missing
    for key in ("general.file_type", "llama.context_length", "llama.embedding_length", "llama.block_count",
                "llama.attention.head_count", "llama.attention.head_count_kv"):
        assert fields[key].types == [gguf.GGUFValueType.UINT32], key
    assert fields["tokenizer.ggml.tokens"].types[0] == gguf.GGUFValueType.ARRAY  # its memory estimate needs it
    assert fields["general.architecture"].contents() == "llama"
    assert "general.type" not in fields or fields["general.type"].contents() != "adapter"


def test_agreement_counts_qat_tokens_matched(tiny):
    _, tok = tiny
    ours = tok("the quick brown fox jumps", add_special_tokens=False)["input_ids"]
    assert check.agreement(tok, ours, "the quick brown fox jumps") == len(ours)
    assert check.agreement(tok, ours, "the quick brown fox jumps\n") == len(ours)  # trailing newline printed
    first = tok.decode(ours[:2], clean_up_tokenization_spaces=False)
    assert check.agreement(tok, ours, first + "\u00e9t\u00e9") == 2
    assert check.agreement(tok, ours, "") == 0


STAND_IN = '''
    import json, os, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path
    store = Path(os.environ["OLLAMA_MODELS"])
    host, port = os.environ["OLLAMA_HOST"].split(":")
    if sys.argv[1] == "create":
        src = Path(sys.argv[4]).read_text().split("FROM ", 1)[1].strip()
        if not Path(src).is_file():
            sys.exit(f"Error: no such file {src}")
        (store / (sys.argv[2] + ".json")).write_text(json.dumps({"from": src}))
        sys.exit(0)
    runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    (store / "runner.pid").write_text(str(runner.pid))
    if os.environ.get("STAND_IN_MUTE"):
        time.sleep(300)
    class H(BaseHTTPRequestHandler):
        def answer(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        def do_GET(self):
            self.answer({"version": "0.0.0-stand-in"})
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with open(store / "requests.jsonl", "a") as f:
                f.write(json.dumps({"path": self.path, **req}) + "\\n")
            if self.path == "/api/show":
                self.answer({"details": {"family": "llama", "quantization_level": "Q4_0"}, "template": "{{ .Prompt }}",
                             "model_info": {"general.architecture": "llama", "general.parameter_count": 1}})
            else:
                self.answer({"response": " stand-in", "eval_count": 2})
    ThreadingHTTPServer((host, int(port)), H).serve_forever()
'''


@pytest.fixture
def stand_in(tmp_path):
    exe = tmp_path / "ollama"
    exe.write_text(f"#!{sys.executable}\n" + textwrap.dedent(STAND_IN))
    exe.chmod(0o755)
    return exe


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_script_server_handling_with_a_stand_in(stand_in, exported, tmp_path):
    """The plumbing only (the stand-in is not Ollama): loopback, Modelfile, greedy options, show mismatches
    reported, server and runner stopped."""
    assert check.find_ollama(stand_in.parent) == stand_in
    with check.OllamaServer(stand_in, tmp_path / "work") as server:
        assert server.host.startswith("127.0.0.1:") and server.version == "0.0.0-stand-in"
        server.create("qat-q8", exported["Q8_0"])
        mismatch = check.show_mismatches(server.show("qat-q8"), check.expected_show(exported["Q8_0"]))
        answer = server.generate("qat-q8", "Hello", N_TOKENS)
        runner = int((tmp_path / "work" / "models" / "runner.pid").read_text())
        with pytest.raises(RuntimeError, match="no such file"):
            server.create("missing", tmp_path / "missing.gguf")
    assert answer["response"] == " stand-in"
    assert any(m.startswith("quantization_level: ollama 'Q4_0', file 'Q8_0'") for m in mismatch)
    assert any(m.startswith("parameter_count") for m in mismatch) and not any(m.startswith("family") for m in mismatch)
    assert f"FROM {exported['Q8_0'].resolve()}" in (tmp_path / "work" / "qat-q8.Modelfile").read_text()
    sent = [json.loads(line) for line in (tmp_path / "work" / "models" / "requests.jsonl").read_text().splitlines()]
    gen = next(r for r in sent if r["path"] == "/api/generate")
    assert gen["raw"] is True and gen["options"]["temperature"] == 0 and gen["options"]["num_predict"] == N_TOKENS
    assert gen["options"]["repeat_penalty"] == 1.0 and gen["options"]["stop"] == []
    assert server.proc.poll() is not None
    deadline = time.monotonic() + 10
    while _alive(runner) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(runner)


def test_server_that_never_answers_is_stopped(stand_in, tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_MUTE", "1")
    server = check.OllamaServer(stand_in, tmp_path, start_timeout=3)
    with pytest.raises(RuntimeError, match="did not answer on 127.0.0.1"):
        server.__enter__()
    assert server.proc.poll() is not None


@needs_ollama
@pytest.mark.parametrize("gguf_type", ["F16", "Q8_0", "Q4_K_M"])
def test_ollama_runs_our_file(tiny, exported, tmp_path, gguf_type):
    from qat.export import load_any

    _, tok = tiny
    path = exported[gguf_type]
    model = load_any(path)
    with check.OllamaServer(BIN, tmp_path) as server:
        server.create("qat-tiny", path)
        show = server.show("qat-tiny")
        assert check.show_mismatches(show, check.expected_show(path)) == []
        for prompt in check.TINY_PROMPTS:
            ours = check.qat_generate(model, tok, prompt, N_TOKENS)
            answer = server.generate("qat-tiny", prompt, N_TOKENS)
            agree = check.agreement(tok, ours, answer["response"])
            assert answer["eval_count"] >= 1 and agree >= 1, (prompt, ours, answer["response"])
            if gguf_type == "F16":
                assert agree == len(ours), (prompt, tok.decode(ours), answer["response"])
