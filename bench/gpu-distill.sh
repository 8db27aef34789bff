#!/usr/bin/env bash
# DMD-style distillation steps at SD3.5-Medium size, 1024 px, random weights, no downloads (a few
# minutes on one H100/H200): LoRA adapters on one bf16 base, and full fine-tuning (fp32 masters,
# bf16 autocast, gradient checkpointing); peak memory beside the training-memory plan
# (`sd35flash plan --train`) and seconds per step.
# Usage: bench/gpu-distill.sh [OUT_JSON] [extra gpu_distill_bench arguments, e.g. --tiny --device cpu]
# Needs a CUDA build of torch (see README, "Set-up"); PYTHON picks the interpreter.
set -euo pipefail
OUT=${1:-runs/gpu-distill.json}
shift || true
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$(dirname "$OUT")"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
timeout 470 "$PY" -m sd35flash.deploy.tools.gpu_distill_bench --json "$OUT" "$@"
echo "wrote $OUT"
