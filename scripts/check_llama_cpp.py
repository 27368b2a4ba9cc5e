"""Run qat's GGUF exports in llama.cpp and compare with qat's own loader, side by side, in one run.

    .venv/bin/python scripts/check_llama_cpp.py --llama-cpp /work/llamacpp_build            # tiny Llama
    .venv/bin/python scripts/check_llama_cpp.py --family gemma3_text --types F32,Q8_0,Q4_K_M   # tiny Gemma 3
    .venv/bin/python scripts/check_llama_cpp.py --model smollm2-135m --types F16,Q8_0,Q4_0,Q4_K_M,Q6_K \
        --prompt "The capital of France is"
    QAT_LLAMA_CPP=/path/to/build .venv/bin/python scripts/check_llama_cpp.py --gguf out/m.gguf --text wiki.txt

For each type: export with `qat.export.export_gguf` (or take --gguf files as they are), run `llama-perplexity`
on a text file with `--kl-divergence-base` so it also dumps its next-token log-probabilities, then feed the
*same token ids* (llama.cpp's own tokenization, read back from the dump) through the file loaded by qat's
loader (`load_any`) and score them with llama-perplexity's protocol (chunks of n_ctx tokens, the second half
of each chunk scored). Prints: type, file MB, bits per weight, llama.cpp ppl, qat ppl, relative difference,
max / mean |log-prob difference| (entries within 16 nats of the top, as llama.cpp stores them), top-1
agreement, and whether llama.cpp's tokenization of the text equals the embedded tokenizer's (transformers).

llama.cpp is found from --llama-cpp, $QAT_LLAMA_CPP (a build folder, its bin/, or the binary itself) or PATH.
Build it with AMX off on VMs that advertise AMX but trap it (see docs/export.md, "llama.cpp / Ollama").
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BINARY = "llama-perplexity"
LOGPROB_WINDOW = 16.0  # llama-perplexity stores log-probs only down to (top - 16) nats


def find_llama_cpp(hint: str | os.PathLike | None = None) -> Path | None:
    """The folder holding `llama-perplexity`: from `hint`, else $QAT_LLAMA_CPP, else PATH; None if absent.

    `hint` / $QAT_LLAMA_CPP may name a build folder (binaries in bin/), the bin folder or the binary.

    Example:
        >>> find_llama_cpp("/work/llamacpp_build")
        PosixPath('/work/llamacpp_build/bin')
    """
    for cand in (hint, os.environ.get("QAT_LLAMA_CPP")):
        if not cand:
            continue
        p = Path(cand).expanduser()
        for d in (p.parent if p.is_file() else p, p / "bin", p / "build" / "bin"):
            if (d / BINARY).is_file():
                return d
    found = shutil.which(BINARY)
    return Path(found).parent if found else None


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        if proc.returncode == -signal.SIGILL:
            tail += ("\nillegal instruction: this llama.cpp build uses CPU instructions this machine lacks "
                     "(an AVX-512 build on an AVX2-only CPU?); rebuild it as docs/export.md says")
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout + proc.stderr


def llama_cpp_source(bin_dir: Path) -> Path | None:
    """The llama.cpp source folder a build was made from (its CMakeCache.txt's CMAKE_HOME_DIRECTORY), if it holds
    convert_hf_to_gguf.py; None otherwise."""
    for cache in (bin_dir / "CMakeCache.txt", bin_dir.parent / "CMakeCache.txt"):
        if cache.is_file():
            match = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.+)$", cache.read_text(), re.M)
            if match and (Path(match.group(1)) / "convert_hf_to_gguf.py").is_file():
                return Path(match.group(1))
    return None


# llama.cpp's converter on a tiny model folder: its tokenizer hash table does not know a freshly trained BPE (it
# is told "gpt-2", the tokenizer's actual pre-tokenizer), there is no tokenizer.model (sentencepiece need not be
# installed) and Phi-3's vocabulary reader wants one: the byte-level reader is used, as for Phi-4
_CONVERT = """
import runpy, sys
src, pairs = sys.argv[1], sys.argv[2:]
sys.path[:0] = [src + "/gguf-py", src]
import conversion.base as base
import conversion.phi as phi
def no_spm(self):
    raise FileNotFoundError("no tokenizer.model")
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
base.TextModel._create_vocab_sentencepiece = no_spm
phi.Phi3MiniModel.set_vocab = lambda self: self._set_vocab_gpt2()
for folder, out in zip(pairs[::2], pairs[1::2]):
    sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", "f32"]
    runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def convert_hf_to_gguf(src: Path, jobs: list[tuple[Path, Path]], timeout: float = 900) -> None:
    """llama.cpp's own `convert_hf_to_gguf.py` (from source folder `src`) on saved tiny models + byte-level BPE
    tokenizers, each (folder, out) to an F32 GGUF file, in one process (see `_CONVERT` for the three patches a
    tiny model needs).

    Raises:
        RuntimeError: the converter failed (its last lines in the message).
    """
    import sys

    _run([sys.executable, "-c", _CONVERT, str(src), *[str(p) for job in jobs for p in job]], timeout)


@dataclass
class LlamaPerplexity:
    """What llama-perplexity measured: its ppl, its tokens [chunks, n_ctx] and its log-prob dump."""

    ppl: float
    tokens: np.ndarray
    n_vocab: int
    dump: Path

    def logprobs(self, chunk: int, floor: bool = False) -> np.ndarray:
        """Float32 [n_ctx - 1 - n_ctx/2, n_vocab] log-probs of one chunk; -inf below llama.cpp's window
        (with `floor`, the window's floor: exact for the row's minimum when nothing was cut)."""
        n_chunk, n_ctx = self.tokens.shape
        nv = 2 * ((self.n_vocab + 1) // 2) + 4
        n_pos = n_ctx - 1 - n_ctx // 2
        offset = 8 + 4 * 3 + 4 * n_chunk * n_ctx + chunk * n_pos * nv * 2
        raw = np.fromfile(self.dump, dtype=np.uint16, count=n_pos * nv, offset=offset).reshape(n_pos, nv)
        head = raw[:, :4].copy().view(np.float32)  # (scale, min_log_prob) per position
        q = raw[:, 4:4 + self.n_vocab].astype(np.float32)
        out = head[:, 1:2] + head[:, 0:1] * q
        return np.where(q == 0, head[:, 1:2] if floor else -np.inf, out)

    def dump_perplexity(self) -> float:
        """Perplexity from the dumped log-probs (stored to ~1e-4 nats; a target below the 16-nat window
        counts at the window's floor)."""
        n_ctx = self.tokens.shape[1]
        nll, count = 0.0, 0
        for c in range(self.tokens.shape[0]):
            lp = self.logprobs(c, floor=True)
            target = self.tokens[c, n_ctx // 2 + 1:]
            nll -= float(lp[np.arange(len(target)), target].astype(np.float64).sum())
            count += len(target)
        return float(np.exp(nll / count))


def llama_perplexity(bin_dir: Path, gguf: Path, text: Path, n_ctx: int, chunks: int, work: Path,
                     threads: int = 2, timeout: float = 1800, extra: list[str] | tuple[str, ...] = (),
                     env: dict[str, str] | None = None) -> LlamaPerplexity:
    """Run `llama-perplexity` on `text` with chunks of `n_ctx` tokens and read back its ppl and log-probs.
    `extra`: more arguments (e.g. a quantized KV cache: -ctk q8_0 -ctv q8_0 -fa on); `env`: variables added to
    the environment (LLAMA_ATTN_ROT_DISABLE=1).

    Raises:
        RuntimeError: llama.cpp refused the file (its last log lines are in the message).
    """
    dump = work / f"{gguf.stem}.logits"
    out = _run([str(bin_dir / BINARY), "-m", str(gguf), "-f", str(text), "-c", str(n_ctx), "-b", str(n_ctx),
                "--chunks", str(chunks), "-t", str(threads), "--kl-divergence-base", str(dump), *extra], timeout, env)
    with open(dump, "rb") as f:
        if f.read(8) != b"_logits_":
            raise RuntimeError(f"{dump}: not a llama-perplexity logits file")
        ctx, n_vocab, n_chunk = np.frombuffer(f.read(12), dtype=np.int32)
        tokens = np.frombuffer(f.read(4 * n_chunk * ctx), dtype=np.int32).reshape(n_chunk, ctx)
    ref = LlamaPerplexity(float("nan"), tokens, int(n_vocab), dump)
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    # llama.cpp logs from a worker thread and can drop its last lines at exit: then score its own dump
    ref.ppl = float(match.group(1)) if match else ref.dump_perplexity()
    return ref


def llama_tokenize(bin_dir: Path, gguf: Path, text: str, work: Path) -> list[int]:
    """llama.cpp's token ids for `text` with the vocabulary embedded in `gguf` (`llama-tokenize --ids`)."""
    src = work / "tokenize_input.txt"
    src.write_text(text)
    out = _run([str(bin_dir / "llama-tokenize"), "-m", str(gguf), "-f", str(src), "--ids", "--log-disable",
                "--no-escape"], 120)
    match = re.search(r"\[([0-9, ]*)\]\s*$", out.strip())
    if match is None:
        raise RuntimeError(f"llama-tokenize printed no id list:\n{out[-1000:]}")
    return [int(x) for x in match.group(1).split(",") if x.strip()]


def llama_generate(bin_dir: Path, gguf: Path, prompt: str, n_tokens: int = 24, timeout: float = 600) -> str:
    """llama.cpp's greedy continuation of `prompt` (`llama-completion --temp 0`, no chat template), without the
    prompt.

    llama-completion prints tokens from a logging thread and sometimes drops the tail at exit (1 run in 12
    here, once the whole text): it is run until two runs print the same text (at most 4), the longest kept.
    Its stdout is read as bytes (a random model's byte tokens need not be UTF-8).

    Raises:
        RuntimeError: llama-completion failed, or printed no echo of the prompt.
    """
    seen: list[str] = []
    for _ in range(4):
        proc = subprocess.run([str(bin_dir / "llama-completion"), "-m", str(gguf), "-p", prompt, "-n",
                               str(n_tokens), "--temp", "0", "-t", "1", "-no-cnv", "--no-warmup"],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"llama-completion failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-2000:].decode(errors='replace')}")
        text = proc.stdout.decode("utf-8", "replace").replace("[end of text]", "").rstrip("\n")
        if text in seen:
            break
        seen.append(text)
    best = max(seen, key=len)
    if not best.startswith(prompt):
        raise RuntimeError(f"llama-completion printed no echo of the prompt: {best[:200]!r}")
    return best[len(prompt):]


@torch.no_grad()
def compare(model: torch.nn.Module, ref: LlamaPerplexity, add_bos: int | None = None) -> dict:
    """qat's model on llama.cpp's own tokens, scored as llama-perplexity scores them, against its log-probs.

    Args:
        model: the GGUF file loaded by qat (`load_any`).
        ref: what `llama_perplexity` read back.
        add_bos: the BOS id when the file asks llama.cpp to add one (it replaces each chunk's first token).
    Returns:
        {"ppl", "max_abs", "mean_abs", "top1"}: our perplexity and the log-prob differences (entries that
        llama.cpp stored in both, i.e. within 16 nats of its top token), top-1 agreement in [0, 1].
    """
    n_chunk, n_ctx = ref.tokens.shape
    first = n_ctx // 2
    nll, count, diffs, same, top_n = 0.0, 0, [], 0, 0
    for c in range(n_chunk):
        ids = torch.from_numpy(ref.tokens[c].astype(np.int64)).clone()
        if add_bos is not None:
            ids[0] = add_bos
        lp = torch.log_softmax(model(ids[None]).logits[0, first:n_ctx - 1].double(), -1)[:, :ref.n_vocab]
        nll -= float(lp.gather(1, ids[first + 1:, None]).sum())
        count += n_ctx - 1 - first
        theirs = torch.from_numpy(ref.logprobs(c)).double()
        stored = torch.isfinite(theirs)
        diffs.append((lp - theirs)[stored].abs())
        same += int((lp.argmax(-1) == theirs.argmax(-1)).sum())
        top_n += lp.shape[0]
    d = torch.cat(diffs)
    return {"ppl": float(np.exp(nll / count)), "max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "top1": same / top_n}


def tokenization_matches(tokenizer, text: str, ref: LlamaPerplexity) -> str:
    """'yes' when the embedded tokenizer (transformers) gives llama.cpp's tokens for the scored text, else
    where they first differ."""
    ours = tokenizer(text, add_special_tokens=False)["input_ids"][: ref.tokens.size]
    theirs = ref.tokens.reshape(-1).tolist()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return f"no (token {i}: transformers {a}, llama.cpp {b})"
    return "yes"


def tiny_model_and_tokenizer(text: str, vocab_size: int = 320, model_type: str = "llama"):
    """A 2-layer random model of `model_type` (one of `qat.testing.FAMILIES`, hidden 256 so K-quant super-blocks
    fit, norms and biases perturbed for the non-Llama families; or an MoE family of `qat.testing.MOE_FAMILIES`,
    8 experts of 256, top-2) and a byte-level BPE tokenizer trained on `text` with exactly `vocab_size` tokens."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from qat.testing import MOE_FAMILIES, tiny_llama, tiny_model, tiny_moe

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([text], trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>",
                                               eos_token="<|endoftext|>")
    if model_type in MOE_FAMILIES:
        return tiny_moe(model_type, vocab_size=vocab_size, hidden_size=256, expert_size=256, num_experts=8), tok
    size = dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, max_position_embeddings=256)
    model = tiny_llama(**size) if model_type == "llama" else tiny_model(model_type, **size, vector_noise=0.1)
    return model, tok


def default_text(model: str) -> str:
    """The scored text: the wiki test split (articles joined by blank lines) for real models, the test
    fixture corpus for the tiny one."""
    if model == "tiny":
        return (Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny_corpus.txt").read_text()
    from qat.data import load_documents, split_documents

    docs = split_documents(load_documents("wiki", "extract"), 0.02, 0.02)["test"]
    return "\n\n".join(docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", help="llama.cpp build folder (default: $QAT_LLAMA_CPP, then PATH)")
    parser.add_argument("--model", default="tiny", help="'tiny' or anything qat-export's model.path takes")
    parser.add_argument("--family", default="llama", help="the tiny model's model_type (qat.testing.FAMILIES or MOE_FAMILIES)")
    parser.add_argument("--types", default="F16,Q8_0,Q4_0,Q4_K_M,Q6_K")
    parser.add_argument("--gguf", nargs="*", help="check these files instead of exporting")
    parser.add_argument("--text", help="a text file to score (default: wiki test split / tiny corpus)")
    parser.add_argument("--ctx", type=int, default=None, help="tokens per chunk (default 256; tiny: 64)")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="keep exports and dumps here (default: a temporary folder)")
    parser.add_argument("--prompt", help="also print llama.cpp's and qat's greedy continuations of this prompt")
    args = parser.parse_args()
    bin_dir = find_llama_cpp(args.llama_cpp)
    if bin_dir is None:
        raise SystemExit(f"{BINARY} not found: give --llama-cpp, set QAT_LLAMA_CPP or put it on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        run_all(args, bin_dir, work)


def _exports(args, work: Path, text: str):
    """(label, GGUF path, the tokenizer the file was made from) for every file to check."""
    from qat.export import export_gguf
    from qat.export.load import load_any, load_any_tokenizer

    if args.gguf:  # the tokenizer to compare with: --model's when given, else the one read from the file
        return [(Path(g).stem, Path(g), load_any_tokenizer(g if args.model == "tiny" else args.model))
                for g in args.gguf]
    if args.model == "tiny":
        model, tok = tiny_model_and_tokenizer(text, model_type=args.family)
    else:
        model, tok = load_any(args.model), load_any_tokenizer(args.model)
    return [(t, export_gguf(model, work / f"{Path(args.model).name}-{t}.gguf", t, tokenizer=tok), tok)
            for t in args.types.split(",")]


def run_all(args, bin_dir: Path, work: Path) -> None:
    """Export, run llama.cpp, load with qat, print the table (see the module docstring)."""
    from qat.export.load import load_any
    from qat.jobs.measure import file_bits_per_weight

    text_path = Path(args.text) if args.text else work / "text.txt"
    if not args.text:
        text_path.write_text(default_text(args.model))
    text = text_path.read_text()
    n_ctx = args.ctx or (64 if args.model == "tiny" and not args.gguf else 256)
    print(f"llama.cpp: {bin_dir}  text: {text_path} ({len(text)} chars)  n_ctx {n_ctx} x {args.chunks} chunks")
    print(f"{'file':22} {'MB':>7} {'bpw':>6} {'llama.cpp':>10} {'qat':>10} {'rel diff':>9} "
          f"{'max|dlp|':>9} {'mean|dlp|':>10} {'top1':>6}  same tokens")
    for label, path, tok in _exports(args, work, text):
        ref = llama_perplexity(bin_dir, path, text_path, n_ctx, args.chunks, work, args.threads)
        model = load_any(path)
        res = compare(model, ref)
        _, bpw = file_bits_per_weight(path, model)
        same = tokenization_matches(tok, text, ref)
        print(f"{label:22} {path.stat().st_size / 1e6:7.1f} {bpw:6.2f} {ref.ppl:10.4f} {res['ppl']:10.4f} "
              f"{res['ppl'] / ref.ppl - 1:+9.2e} {res['max_abs']:9.4f} {res['mean_abs']:10.5f} "
              f"{res['top1']:6.3f}  {same}", flush=True)
        ref.dump.unlink(missing_ok=True)
        if args.prompt:
            ids = tok(args.prompt, return_tensors="pt", add_special_tokens=False).input_ids
            ours = tok.decode(model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:])
            print(f"  llama.cpp: {llama_generate(bin_dir, path, args.prompt, 24)!r}\n  qat:       {ours!r}", flush=True)


if __name__ == "__main__":
    main()
