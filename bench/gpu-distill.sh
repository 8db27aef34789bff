#!/usr/bin/env bash
# DMD-style distillation steps at SD3.5-Medium size, 1024 px, random weights, no downloads (a few
# minutes on one H100/H200): LoRA adapters on one bf16 base, and full fine-tuning (fp32 masters,
# bf16 autocast, gradient checkpointing); peak memory beside the training-memory plan
# (`sd35flash plan --train`) and seconds per step. With more than one GPU visible it then runs the
# real `sd35flash distill` in full mode with `--sharding fsdp` (FSDP2 over every GPU, NCCL) on the
# shipped toy teacher: a functional check of sharded training, sharded checkpoints and the gathered
# export, timed; its student goes to OUT_JSON's folder (fsdp-student/).
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
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${GPUS:-0}" -gt 1 ]; then
  BATCH=$((GPUS * 2))  # the global batch must divide over the processes
  START=$(date +%s)
  SD35FLASH_CACHE=${SD35FLASH_CACHE:-$(dirname "$OUT")/fsdp-cache} timeout 600 "$PY" -m torch.distributed.run \
    --standalone --nproc_per_node "$GPUS" -m sd35flash distill --preset smoke --sharding fsdp --no-progress \
    --out "$(dirname "$OUT")/fsdp-student" --set batch_size=$BATCH --set trajectory.batch_size=$BATCH
  echo "fsdp: sd35flash distill --sharding fsdp on $GPUS GPUs took $(( $(date +%s) - START )) s"
fi
