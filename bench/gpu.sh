#!/usr/bin/env bash
# SD3.5-Medium-size latency and memory on one GPU, random weights, no downloads (under 10 minutes on
# an H100): 4-step student vs 40-step CFG teacher at 512 and 1024 px, peak memory with and without a
# T5-XXL-size encoder (beside the memory planner's prediction), bf16 vs torchao int8 vs fp8.
# Usage: bench/gpu.sh [OUT_JSON] [extra gpu_bench arguments, e.g. --tiny --device cpu]
# Needs a CUDA build of torch (see README, "Set-up"); PYTHON picks the interpreter.
set -euo pipefail
OUT=${1:-runs/gpu-bench.json}
shift || true
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$(dirname "$OUT")"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
timeout 590 "$PY" -m sd35flash.deploy.tools.gpu_bench --json "$OUT" "$@"
echo "wrote $OUT"
