#!/usr/bin/env bash
# The main job on its small built-in default (pass Hydra overrides through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/qat-demo "$@"
