#!/usr/bin/env bash
# The whole pipeline on one GPU in at most 8 minutes, every stage under its own budget (see Training/gpu_run.py):
#
#   bash Training/gpu_run.sh [SHARED_DATA_DIR] [OUT_DIR] [flags of python -m Training.gpu_run, e.g. --pretrain-budget 240]
#
# OUT_DIR/summary.json says what each stage did; OUT_DIR/logs/ holds their output.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shared="${1:-$here/../shared/data}"
out="${2:-$here/runs/gpu-run}"
shift $(( $# < 2 ? $# : 2 ))
cd "$here"
exec python -m Training.gpu_run "$shared" "$out" "$@"
