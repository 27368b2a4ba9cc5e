"""Run qat's GGUF exports in Ollama and compare its greedy text with qat's own loader (and llama.cpp's).

    QAT_OLLAMA=/path/to/ollama .venv/bin/python scripts/check_ollama.py                     # tiny Llama
    .venv/bin/python scripts/check_ollama.py --ollama ~/go/bin/ollama --model smollm2-135m \
        --types F16,Q8_0,Q4_K_M,Q4_0 --llama-cpp /work/llamacpp_build
    .venv/bin/python scripts/check_ollama.py --gguf out/m-Q8_0.gguf --model smollm2-135m

For each file (exported with `qat.export.export_gguf`, or taken from --gguf): start `ollama serve` on a free
loopback port (127.0.0.1 only) with a temporary OLLAMA_MODELS and HOME, `ollama create NAME -f Modelfile`
(`FROM /abs/file.gguf`), read `/api/show`, then `/api/generate` greedily (raw prompt, temperature 0, top_k 1,
repeat_penalty 1, seed 0, no stop strings) and compare the text with qat's `generate` on the file loaded by
`load_any` (and `llama-completion --temp 0` when llama.cpp is found). The server and its runners are always
stopped, every call has a timeout. Other OLLAMA_* variables of the caller pass through (OLLAMA_NEW_ENGINE=1
runs `llama` files on Ollama's Go engine instead of its llama.cpp runner).

Printed per file and prompt: whether Ollama loaded it, what /api/show reports (family, parameter count,
quantization label, context length, detected template) against what the file says (the same rules as
Ollama's source: family = general.architecture, parameters = sum of tensor elements, label = the name of
general.file_type), and how many of qat's greedy tokens Ollama's / llama.cpp's text agrees with.

Ollama is found from --ollama, $QAT_OLLAMA (the binary or a folder holding it) or PATH. See /work/notes or
docs/export.md ("llama.cpp / Ollama") for how it was built.
"""
from __future__ import annotations

import argparse
import codecs
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BINARY = "ollama"
PROMPTS = ("The capital of France is", "Once upon a time, there was a little")
TINY_PROMPTS = ("the quick brown fox", "Hello, world")
# Greedy, and none of Ollama's defaults that change the argmax (repeat_penalty 1.1, stop strings of the
# detected chat template); num_ctx is capped by Ollama at the file's context_length.
GREEDY = {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0,
          "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": 0, "stop": [], "num_ctx": 512}


def _llama_cpp_helpers():
    """scripts/check_llama_cpp.py as a module (its finder, tiny model and text)."""
    spec = importlib.util.spec_from_file_location("check_llama_cpp", ROOT / "scripts" / "check_llama_cpp.py")
    module = sys.modules.setdefault("check_llama_cpp", importlib.util.module_from_spec(spec))
    if not hasattr(module, "find_llama_cpp"):
        spec.loader.exec_module(module)
    return module


def find_ollama(hint: str | os.PathLike | None = None) -> Path | None:
    """The `ollama` binary: from `hint`, else $QAT_OLLAMA (each the binary or a folder holding it, or its
    bin/), else PATH; None if absent.

    Example:
        >>> find_ollama("/work/gopath/bin")
        PosixPath('/work/gopath/bin/ollama')
    """
    for cand in (hint, os.environ.get("QAT_OLLAMA")):
        if not cand:
            continue
        p = Path(cand).expanduser()
        for f in (p, p / BINARY, p / "bin" / BINARY):
            if f.is_file() and os.access(f, os.X_OK):
                return f
    found = shutil.which(BINARY)
    return Path(found) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OllamaServer:
    """`ollama serve` on 127.0.0.1 with its own model folder and HOME, stopped on exit (with its runners).

    Args:
        binary: the ollama executable.
        work: a folder for the model store, HOME and the server log.
        start_timeout: seconds to wait for the API to answer.
    Raises:
        RuntimeError: the server exited or did not answer in time (the log's last lines are in the message).
    Example:
        >>> with OllamaServer(find_ollama(), Path(tmp)) as server:
        ...     server.create("m", Path("m.gguf")); print(server.generate("m", "Hello", 8)["response"])
    """

    def __init__(self, binary: Path, work: Path, start_timeout: float = 60):
        self.binary, self.work, self.start_timeout = Path(binary), Path(work), start_timeout
        self.host = f"127.0.0.1:{_free_port()}"
        self.env = {**os.environ, "OLLAMA_HOST": self.host, "OLLAMA_MODELS": str(self.work / "models"),
                    "HOME": str(self.work / "home"), "OLLAMA_NOPRUNE": "1", "OLLAMA_NUM_PARALLEL": "1",
                    "OLLAMA_MAX_LOADED_MODELS": "1", "OLLAMA_KEEP_ALIVE": "5m", "OLLAMA_NO_CLOUD": "1"}
        self.log = self.work / "ollama-serve.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "OllamaServer":
        for d in ("models", "home"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:  # its own session: stop() ends the runners it spawns too
            self.proc = subprocess.Popen([str(self.binary), "serve"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"ollama serve exited (code {self.proc.returncode}):\n{self.log_tail()}")
            try:
                self.version = self.request("GET", "/api/version", timeout=2)["version"]
                return self
            except (OSError, ValueError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"ollama serve did not answer on {self.host} in {self.start_timeout:.0f}s:\n"
                           f"{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, grace: float = 10) -> None:
        """SIGTERM the server's process group, SIGKILL it after `grace` seconds."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # runners left in the group after the server itself exited
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def request(self, method: str, path: str, payload: dict | None = None, timeout: float = 600) -> dict:
        """One JSON API call; an error answer raises RuntimeError with Ollama's message."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(f"http://{self.host}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:  # no proxy: the server is on loopback
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=timeout) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"ollama {path}: HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from e

    def create(self, name: str, gguf: Path, timeout: float = 600) -> None:
        """`ollama create NAME -f Modelfile` with `FROM <gguf>`, as a user would.

        Raises:
            RuntimeError: Ollama refused the file (its message and the server log are in the error).
        """
        modelfile = self.work / f"{name}.Modelfile"
        modelfile.write_text(f"FROM {Path(gguf).resolve()}\n")
        proc = subprocess.run([str(self.binary), "create", name, "-f", str(modelfile)], env=self.env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"ollama create {name} failed (exit {proc.returncode}): "
                               f"{(proc.stdout + proc.stderr)[-2000:]}\n--- server log ---\n{self.log_tail()}")

    def show(self, name: str) -> dict:
        """/api/show: details (family, parameter_size, quantization_level), model_info, template, ..."""
        return self.request("POST", "/api/show", {"model": name, "name": name}, timeout=120)

    def generate(self, name: str, prompt: str, n_tokens: int, timeout: float = 600) -> dict:
        """Greedy /api/generate of `n_tokens` after the raw `prompt` (no template): the whole answer."""
        return self.request("POST", "/api/generate", {
            "model": name, "prompt": prompt, "raw": True, "stream": False,
            "options": {**GREEDY, "num_predict": n_tokens, "num_thread": min(os.cpu_count() or 1, 4)}},
            timeout=timeout)


def expected_show(path: Path) -> dict:
    """What Ollama's `show` should report for a GGUF file, by the rules of its source (fs/gguf, server/create.go).

    Returns:
        {"family", "parameter_count", "quantization_level", "context_length", "chat_template"}.
    Example:
        >>> expected_show(Path("m-Q8_0.gguf"))["quantization_level"]
        'Q8_0'
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = reader.fields

    def value(key, default=None):
        return fields[key].contents() if key in fields else default

    arch = value("general.architecture", "unknown")
    ftype = value("general.file_type")
    label = "unknown" if ftype is None else gguf.LlamaFileType(ftype).name.split("_", 1)[1]
    return {"family": arch, "parameter_count": int(sum(int(t.n_elements) for t in reader.tensors)),
            "quantization_level": label, "context_length": value(f"{arch}.context_length"),
            "chat_template": value("tokenizer.chat_template")}


def show_fields(show: dict) -> dict:
    """The same fields as `expected_show`, read from Ollama's /api/show answer."""
    details, info = show.get("details", {}), show.get("model_info", {})
    arch = info.get("general.architecture", details.get("family"))
    return {"family": details.get("family"), "parameter_count": info.get("general.parameter_count"),
            "parameter_size": details.get("parameter_size"), "quantization_level": details.get("quantization_level"),
            "context_length": info.get(f"{arch}.context_length"), "template": show.get("template", ""),
            "parameters": show.get("parameters", "")}


def show_mismatches(show: dict, expected: dict) -> list[str]:
    """'key: ollama X, file Y' for each field where Ollama's report differs from the file."""
    got = show_fields(show)
    return [f"{k}: ollama {got[k]!r}, file {expected[k]!r}"
            for k in ("family", "parameter_count", "quantization_level", "context_length") if got[k] != expected[k]]


def _stop_ids(tok) -> set[int]:
    """Tokens that end generation in llama.cpp / Ollama (EOS and the other special tokens)."""
    return {i for i in (tok.all_special_ids or []) if i is not None} | (
        {tok.eos_token_id} if tok.eos_token_id is not None else set())


@torch.no_grad()
def qat_generate(model, tok, prompt: str, n_tokens: int) -> list[int]:
    """qat's greedy continuation ids of `prompt` (no BOS, as our files ask), cut at the first stop token."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=n_tokens, do_sample=False, attention_mask=torch.ones_like(ids),
                         pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    stops = _stop_ids(tok)
    return out[:next((i for i, t in enumerate(out) if t in stops), len(out))]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (the tokenizers our GGUF writer embeds are byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tok, ids: list[int]) -> bytes:
    """The bytes a runtime prints for `ids` (byte-level tokens mapped back; added tokens as their text)."""
    table, added = _byte_decoder(), set(tok.get_added_vocab().values())
    out = bytearray()
    for i, piece in zip(ids, tok.convert_ids_to_tokens(ids)):
        out += piece.encode() if i in added or any(c not in table for c in piece) else bytes(table[c] for c in piece)
    return bytes(out)


def _norm(text: str) -> str:
    """Collapse runs of U+FFFD: runtimes replace invalid UTF-8 (byte tokens of a random model) differently."""
    out = []
    for ch in text:
        if not (ch == "\ufffd" and out and out[-1] == "\ufffd"):
            out.append(ch)
    return "".join(out)


def _as_printed(data: bytes) -> str:
    """`data` as a runtime shows it: invalid UTF-8 replaced, an incomplete last character held back."""
    return _norm(codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False))


def agreement(tok, ours: list[int], text: str) -> int:
    """How many of qat's tokens `ours` agree with another runtime's continuation `text`: the longest k whose
    printed text is a prefix of `text` (len(ours) when the texts are equal up to trailing whitespace).
    Invalid UTF-8 compares as U+FFFD runs, so differing invalid bytes are not told apart."""
    text = _norm(text)
    if _norm(token_bytes(tok, ours).decode("utf-8", "replace")).rstrip() == text.rstrip():
        return len(ours)
    k = 0
    while k < len(ours) and text.startswith(_as_printed(token_bytes(tok, ours[:k + 1]))):
        k += 1
    return k


def _exports(args, work: Path):
    """(label, GGUF path, tokenizer, prompts) for every file to check."""
    from qat.export import export_gguf, load_any
    from qat.export.load import load_any_tokenizer

    tiny = args.model == "tiny"
    prompts = args.prompt or (TINY_PROMPTS if tiny else PROMPTS)
    if args.gguf:
        return [(Path(g).stem, Path(g), load_any_tokenizer(g if tiny else args.model), prompts) for g in args.gguf]
    if tiny:
        helpers = _llama_cpp_helpers()
        model, tok = helpers.tiny_model_and_tokenizer(helpers.default_text("tiny"))
    else:
        model, tok = load_any(args.model), load_any_tokenizer(args.model)
    return [(t, export_gguf(model, work / f"{Path(args.model).name}-{t}.gguf", t, tokenizer=tok), tok, prompts)
            for t in args.types.split(",")]


def check_file(server: OllamaServer, label: str, path: Path, tok, prompts, n_tokens: int,
               llama_bin: Path | None) -> list[dict]:
    """Create, show and generate one file; one row per prompt (see the module docstring)."""
    from qat.export import load_any

    name = "qat-" + "".join(c if c.isalnum() else "-" for c in label.lower())
    expected = expected_show(path)
    row = {"file": label, "MB": path.stat().st_size / 1e6, "quant": expected["quantization_level"]}
    try:
        server.create(name, path)
        show = server.show(name)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return [{**row, "loads": "no", "error": str(e)[-600:]}]
    got = show_fields(show)
    row.update(loads="yes", show=got, mismatch=show_mismatches(show, expected))
    model, rows = load_any(path), []
    for prompt in prompts:
        ours = qat_generate(model, tok, prompt, n_tokens)
        try:
            answer = server.generate(name, prompt, n_tokens)
        except (RuntimeError, OSError) as e:
            rows.append({**row, "prompt": prompt, "loads": "no (generate)", "error": str(e)[-600:]})
            continue
        r = {**row, "prompt": prompt, "qat": tok.decode(ours, clean_up_tokenization_spaces=False),
             "n_qat": len(ours), "ollama": answer.get("response", ""), "n_ollama": answer.get("eval_count")}
        r["ollama_agree"] = agreement(tok, ours, r["ollama"])
        if llama_bin is not None:
            r["llama_cpp"] = _llama_cpp_helpers().llama_generate(llama_bin, path, prompt, n_tokens)
            r["llama_agree"] = agreement(tok, ours, r["llama_cpp"])
        rows.append(r)
    return rows


def print_rows(rows: list[dict]) -> None:
    """The results table, then the texts."""
    print(f"{'file':16} {'MB':>6} {'loads':6} {'family':7} {'params':>11} {'quant':8} {'ctx':>6} "
          f"{'show==file':10} {'prompt':24} {'ollama==qat':>11} {'llama.cpp==qat':>14}")
    for r in rows:
        s = r.get("show", {})
        same = "-" if "mismatch" not in r else ("yes" if not r["mismatch"] else "NO")
        agree = lambda k: f"{r[k + '_agree']}/{r['n_qat']}" if k + "_agree" in r else "-"  # noqa: E731
        print(f"{r['file']:16} {r['MB']:6.1f} {r['loads']:6} {str(s.get('family', '-')):7} "
              f"{str(s.get('parameter_count', '-')):>11} {str(s.get('quantization_level', '-')):8} "
              f"{str(s.get('context_length', '-')):>6} {same:10} {r.get('prompt', '-')[:24]:24} "
              f"{agree('ollama'):>11} {agree('llama'):>14}")
    for r in rows:
        for m in r.get("mismatch", []):
            print(f"  {r['file']}: show differs from the file: {m}")
        if "error" in r:
            print(f"  {r['file']}: {r['error']}")
        if "qat" in r:
            print(f"  {r['file']} {r['prompt']!r}\n    qat:       {r['qat']!r}\n    ollama:    {r['ollama']!r}"
                  + (f"\n    llama.cpp: {r['llama_cpp']!r}" if "llama_cpp" in r else ""))
    templates = {r["show"]["template"][:60] for r in rows if "show" in r}
    print("ollama template(s) detected:", [t for t in templates])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ollama", help="the ollama binary (default: $QAT_OLLAMA, then PATH)")
    parser.add_argument("--llama-cpp", help="llama.cpp build folder to compare with (default: $QAT_LLAMA_CPP, PATH)")
    parser.add_argument("--model", default="tiny", help="'tiny' or anything qat-export's model.path takes")
    parser.add_argument("--types", default="F16,Q8_0,Q4_K_M,Q4_0")
    parser.add_argument("--gguf", nargs="*", help="check these files instead of exporting")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable; default: two fixed ones)")
    parser.add_argument("-n", "--tokens", type=int, default=24, help="tokens to generate")
    parser.add_argument("--out", help="keep exports, the model store and the server log here")
    args = parser.parse_args()
    binary = find_ollama(args.ollama)
    if binary is None:
        raise SystemExit(f"{BINARY} not found: give --ollama, set QAT_OLLAMA or put it on PATH")
    llama_bin = _llama_cpp_helpers().find_llama_cpp(args.llama_cpp)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = _exports(args, work)
        rows = []
        with OllamaServer(binary, work) as server:
            print(f"ollama {server.version} ({binary}) on {server.host}; llama.cpp: {llama_bin or 'not found'}")
            for label, path, tok, prompts in files:
                rows += check_file(server, label, path, tok, prompts, args.tokens, llama_bin)
        print_rows(rows)


if __name__ == "__main__":
    main()
