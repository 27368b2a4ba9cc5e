"""qat's GGUF exports against `llama-quantize`'s own quantization of the float model, at the same type, in llama.cpp.

    QAT_LLAMA_CPP=/path/to/build .venv/bin/python scripts/gguf_vs_llama_quantize.py \
        [--model smollm2-135m] [--types MXFP4,IQ4_XS,TQ2_0] [--ctx 256 --chunks 16] \
        [--extra gptq-MXFP4=out/gptq_mxfp4.gguf ...] [--out runs/gguf_vs_lq]

For each type T: qat writes the float model as T (`export_gguf(..., pure=True)`: RTN on T's grid, every 2-D tensor
in T or llama.cpp's fallback for its row length), and `llama-quantize --pure` quantizes qat's F32 export of the
same model to T (`MXFP4_MOE` is llama-quantize's name for the MXFP4 file type; --pure makes every tensor MXFP4,
where its own mix would leave a dense model in Q8_0). Both files are scored by `llama-perplexity` on the same text
(the wiki test split, chunks of --ctx tokens, llama.cpp's protocol) beside the F32 file. `--extra` adds files
made elsewhere (a GPTQ or QAT model exported with `qat-export format=gguf`). Prints one markdown row per file:
bytes, the tensor types it holds (counts), llama.cpp perplexity.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_spec = importlib.util.spec_from_file_location("check_llama_cpp", Path(__file__).with_name("check_llama_cpp.py"))
check = sys.modules.setdefault("check_llama_cpp", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(check)

LQ_NAMES = {"MXFP4": "MXFP4_MOE"}  # llama-quantize's file type names where they differ from the tensor type's


def tensor_types(path: Path) -> str:
    """'MXFP4 x211, F32 x61': the tensor types a GGUF file holds, most frequent first."""
    import gguf

    counts = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors)
    return ", ".join(f"{k} x{v}" for k, v in counts.most_common())


def llama_quantize(bin_dir: Path, src: Path, out: Path, gguf_type: str, threads: int) -> Path:
    """`llama-quantize --pure src out TYPE` (raises RuntimeError with its last lines when it fails)."""
    cmd = [str(bin_dir / "llama-quantize"), "--pure", str(src), str(out), LQ_NAMES.get(gguf_type, gguf_type),
           str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-quantize failed (exit {proc.returncode}):\n"
                           + "\n".join((proc.stdout + proc.stderr).splitlines()[-20:]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", help="llama.cpp build folder (default: $QAT_LLAMA_CPP, then PATH)")
    parser.add_argument("--model", default="smollm2-135m", help="anything qat-export's model.path takes")
    parser.add_argument("--types", default="MXFP4,IQ4_XS,TQ2_0", help="comma-separated; '' scores the F32 file and --extra only")
    parser.add_argument("--extra", nargs="*", default=[], help="label=path.gguf: more files to score")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="keep the files here (default: a temporary folder)")
    args = parser.parse_args()
    bin_dir = check.find_llama_cpp(args.llama_cpp)
    if bin_dir is None or not (bin_dir / "llama-quantize").is_file():
        raise SystemExit("llama-perplexity / llama-quantize not found: give --llama-cpp, set QAT_LLAMA_CPP or "
                         "put them on PATH")
    extra = [e.split("=", 1) for e in args.extra]
    bad = [e for e, parts in zip(args.extra, extra) if len(parts) != 2 or not Path(parts[1]).is_file()]
    if bad:
        raise SystemExit(f"--extra takes label=path.gguf of existing files; not: {bad}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        run(args, bin_dir, work, extra)


def run(args, bin_dir: Path, work: Path, extra: list[list[str]]) -> None:
    """Export, quantize, score; print the table."""
    from qat.export import export_gguf
    from qat.export.load import load_any, load_any_tokenizer

    text = work / "text.txt"
    text.write_text(check.default_text(args.model))
    model, tok = load_any(args.model), load_any_tokenizer(args.model)
    name = Path(args.model).name
    files = [("F32 (llama-quantize's input)", export_gguf(model, work / f"{name}-F32.gguf", "F32", tokenizer=tok))]
    for t in filter(None, args.types.split(",")):
        t0 = time.time()
        ours = export_gguf(model, work / f"{name}-qat-{t}.gguf", t, tokenizer=tok, pure=True)
        files.append((f"qat RTN {t} ({time.time() - t0:.0f} s)", ours))
        t0 = time.time()
        theirs = llama_quantize(bin_dir, files[0][1], work / f"{name}-lq-{t}.gguf", t, args.threads)
        files.append((f"llama-quantize --pure {t} ({time.time() - t0:.0f} s)", theirs))
    files += [(label, Path(path)) for label, path in extra]
    print(f"llama.cpp: {bin_dir}; llama-perplexity -c {args.ctx} --chunks {args.chunks} on {text} "
          f"({text.stat().st_size} bytes)")
    print("| file | bytes | tensor types | llama.cpp perplexity |\n|---|---|---|---|")
    for label, path in files:
        ref = check.llama_perplexity(bin_dir, path, text, args.ctx, args.chunks, work, args.threads)
        ref.dump.unlink(missing_ok=True)
        print(f"| {label} | {path.stat().st_size:,} | {tensor_types(path)} | {ref.ppl:.2f} |", flush=True)


if __name__ == "__main__":
    main()
