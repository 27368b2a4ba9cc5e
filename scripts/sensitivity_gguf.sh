#!/usr/bin/env bash
# GGUF in llama.cpp at equal size: qat-sensitivity's auto-mixed GGUF against llama-quantize Q3_K_M / Q4_K_M of the
# float model, without and with --imatrix (from the same training text), llama-perplexity on the same test text.
# docs/sensitivity.md has the numbers.
#
#   QAT_LLAMA_CPP=/tmp/llsrc/build bash scripts/sensitivity_gguf.sh [out folder]   (default outputs/sensitivity_gguf)
#
# Needs `qat-assets` (SmolLM2-135M, the wiki corpus) and a llama.cpp build with llama-imatrix, llama-quantize,
# llama-perplexity (docs/export.md). Env: PYTHON (default .venv/bin/python), SCORES (a scores.json of an earlier
# `qat-sensitivity menu=gguf` run of the same model: skips the analysis), STEPS (default "all"; a subset of
# texts f16 imatrix quantize auto auto_imatrix gptq qat ppl; "all" is every step but qat), GRID_RUNS (the auto
# layouts the gptq / qat steps quantize, default "auto_noq41_Q4_K_M"). Steps whose output exists are skipped:
# delete a file to redo it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${QAT_LLAMA_CPP:-/tmp/llsrc/build}
[ -x "$BIN/bin/llama-perplexity" ] && BIN=$BIN/bin
OUT=${1:-outputs/sensitivity_gguf}
PY=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-all}
CAL_BLOCKS=32 CAL_LEN=128   # calibration: the Fisher scores' 32 x 128 training tokens, the imatrix's too
PPL_CTX=256 PPL_CHUNKS=16   # llama-perplexity on the wiki test split
MIXES="Q3_K_M Q4_K_M"
mkdir -p "$OUT"
want() { [[ ( " $STEPS " == *" all "* && $1 != qat ) || " $STEPS " == *" $1 "* ]]; }
GRID_RUNS=${GRID_RUNS:-auto_noq41_Q4_K_M}
need() {
  [ -x "$BIN/$1" ] || { echo "no $BIN/$1: set QAT_LLAMA_CPP to a llama.cpp build (docs/export.md)" >&2; exit 2; }
}

# 1. the texts: the wiki corpus split by article exactly as qat's data module splits it (configs/data/wiki.yaml)
if want texts && [ ! -s "$OUT/test.txt" ]; then
  "$PY" - "$OUT" <<'EOF'
import sys
from pathlib import Path
from qat.data import load_documents, split_documents
parts = split_documents(load_documents("wiki", "extract"), 0.02, 0.02, 0)
for split in ("train", "test"):
    Path(sys.argv[1], f"{split}.txt").write_text("\n\n".join(parts[split]) + "\n")
EOF
fi

# 2. the float model as F16 GGUF (the input of llama-quantize and llama-imatrix)
if want f16 && [ ! -s "$OUT/F16.gguf" ]; then
  "$PY" -m qat.cli.export model.path=smollm2-135m format=gguf gguf_type=F16 output="$OUT/F16.gguf" overwrite=true \
    hydra.run.dir="$OUT/export_f16"
fi

# 3. llama.cpp's importance matrix from the training text: as many tokens as the Fisher scores saw
if want imatrix && [ ! -s "$OUT/imatrix.gguf" ]; then
  need llama-imatrix
  "$BIN/llama-imatrix" -m "$OUT/F16.gguf" -f "$OUT/train.txt" -c $CAL_LEN -b $CAL_LEN --chunks $CAL_BLOCKS \
    -o "$OUT/imatrix.gguf" -t "${THREADS:-2}" 2>&1 | tail -n 3
fi

# 4. llama-quantize's mixes, plain and with the imatrix
if want quantize; then
  need llama-quantize
  for mix in $MIXES; do
    [ -s "$OUT/$mix.gguf" ] || "$BIN/llama-quantize" "$OUT/F16.gguf" "$OUT/$mix.gguf" $mix 2 > "$OUT/$mix.log" 2>&1
    [ -s "$OUT/${mix}_imatrix.gguf" ] || "$BIN/llama-quantize" --imatrix "$OUT/imatrix.gguf" "$OUT/F16.gguf" \
      "$OUT/${mix}_imatrix.gguf" $mix 2 > "$OUT/${mix}_imatrix.log" 2>&1
  done
fi

# 5. the auto layouts at each mix's bytes for the 210 scored tensors (the rest, embeddings / norms, is the
# same in both files)
scored_bytes() {  # bytes llama-quantize gave the tensors qat-sensitivity scores (the Linear weights of the blocks)
  "$PY" - "$1" <<'EOF'
import re, sys
import gguf
names = re.compile(r"blk\.\d+\.(attn_[qkv]|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")
print(sum(int(t.n_bytes) for t in gguf.GGUFReader(sys.argv[1]).tensors if names.fullmatch(t.name)))
EOF
}
if want auto; then
  if [ -z "${SCORES:-}" ]; then
    SCORES=$OUT/analysis/scores.json
    [ -s "$SCORES" ] || "$PY" -m qat.cli.sensitivity model=smollm2_135m data=wiki data.block_size=$CAL_LEN \
      calibration.samples=$CAL_BLOCKS menu=gguf budget.bits_per_weight=5 hydra.run.dir="$OUT/analysis" \
      > "$OUT/analysis.log"
  fi
  for mix in $MIXES; do
    bytes=$(scored_bytes "$OUT/$mix.gguf")
    # auto: every GGUF candidate; auto_noq41: Q4_1 left out (SmolLM2's checkpoint sits on the Q4_1 grid)
    for variant in auto auto_noq41; do
      cands=null; [ $variant = auto_noq41 ] && cands='[Q2_K,Q3_K,Q4_0,IQ4_NL,Q4_K,Q5_0,Q5_1,Q5_K,Q6_K,Q8_0]'
      [ -s "$OUT/${variant}_$mix/model.gguf" ] || "$PY" -m qat.cli.sensitivity mode=solve scores="$SCORES" \
        model=smollm2_135m budget.bytes=$bytes candidates="$cands" gguf.export=true gguf.rest=Q8_0 \
        hydra.run.dir="$OUT/${variant}_$mix" > "$OUT/${variant}_$mix.log"
      cp -f "$OUT/${variant}_$mix/model.gguf" "$OUT/${variant}_$mix.gguf"
    done
  done
fi

# 6. the auto layouts' tensor types quantized by llama-quantize with the imatrix (the rest as the auto files: Q8_0)
if want auto_imatrix; then
  need llama-quantize
  for mix in $MIXES; do
    for variant in auto auto_noq41; do
      [ -s "$OUT/${variant}_$mix/tensor_types.txt" ] || continue
      [ -s "$OUT/${variant}_${mix}_imatrix.gguf" ] || "$BIN/llama-quantize" --imatrix "$OUT/imatrix.gguf" \
        --tensor-type-file "$OUT/${variant}_$mix/tensor_types.txt" "$OUT/F16.gguf" "$OUT/${variant}_${mix}_imatrix.gguf" \
        Q8_0 2 > "$OUT/${variant}_${mix}_imatrix.log" 2>&1
    done
  done
fi

# 7. our own fits on the chosen grids, exported by qat-export (the rest Q8_0): GPTQ on the Fisher scores' 32 x 128
# training tokens (its K-quant / IQ4 scales fitted with diag(H) weights, llama.cpp's imatrix fit), and QAT from
# that start (the README protocol: 120 steps x 2 x 128 tokens distilled from the float model; step "qat")
recipe_of() {  # the recipe an auto run wrote (its layout.json names it)
  "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["recipe"])' "$OUT/$1/layout.json"
}
grid_export() {  # run, checkpoint, output
  "$PY" -m qat.cli.export model.path=smollm2-135m quant="$(recipe_of "$1")" checkpoint="$2" format=gguf \
    gguf_type=Q8_0 output="$3" overwrite=true hydra.run.dir="$OUT/export_$(basename "$3" .gguf)" > /dev/null
}
for run in $GRID_RUNS; do
  if want gptq && [ ! -s "$OUT/${run}_gptq.gguf" ]; then
    "$PY" -m qat.cli.ptq model=smollm2_135m data=wiki data.block_size=$CAL_LEN data.max_eval_blocks=32 method=gptq \
      calibration.samples=$CAL_BLOCKS quant="$(recipe_of "$run")" hydra.run.dir="$OUT/${run}_gptq" \
      > "$OUT/${run}_gptq.log" 2>&1
    grid_export "$run" "$OUT/${run}_gptq/model.pt" "$OUT/${run}_gptq.gguf"
  fi
  if want qat && [ ! -s "$OUT/${run}_qat.gguf" ]; then
    "$PY" -m qat.cli.train model=smollm2_135m data=wiki data.block_size=$CAL_LEN data.max_eval_blocks=32 \
      experiment=smollm2_w4_qat eval.baselines=false init=gptq quant="$(recipe_of "$run")" eval.tasks=[] \
      hydra.run.dir="$OUT/${run}_qat" > "$OUT/${run}_qat.log" 2>&1
    grid_export "$run" "$(ls "$OUT/${run}_qat"/checkpoints/last*.ckpt | head -n 1)" "$OUT/${run}_qat.gguf"
  fi
done

# 8. llama-perplexity of every file on the test text
if want ppl; then
  need llama-perplexity
  printf "| file | bytes | scored tensors' bytes | llama.cpp perplexity |\n|---|---|---|---|\n" | tee "$OUT/results.md"
  for f in F16 $(for m in $MIXES; do echo $m ${m}_imatrix auto_$m auto_${m}_imatrix auto_noq41_$m auto_noq41_${m}_imatrix; done) \
    $(for r in $GRID_RUNS; do echo ${r}_gptq ${r}_qat; done); do
    [ -s "$OUT/$f.gguf" ] || continue
    [ -s "$OUT/$f.ppl" ] || "$BIN/llama-perplexity" -m "$OUT/$f.gguf" -f "$OUT/test.txt" -c $PPL_CTX -b $PPL_CTX \
      --chunks $PPL_CHUNKS -t "${THREADS:-2}" > "$OUT/$f.ppl" 2>&1
    ppl=$(grep -o "Final estimate: PPL = [0-9.]*" "$OUT/$f.ppl" | awk '{print $NF}')
    printf "| %s | %s | %s | %s |\n" "$f" "$(stat -c %s "$OUT/$f.gguf")" "$(scored_bytes "$OUT/$f.gguf")" "$ppl" \
      | tee -a "$OUT/results.md"
  done
fi
