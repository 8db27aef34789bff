#!/usr/bin/env bash
# Train the shipped teacher's architecture on one H100/H200-class GPU and evaluate it, in under
# 8 minutes: `sd35flash pretrain --preset teacher-gpu` (bf16 autocast, batch 256, 5,000 flow steps),
# then bench/eval_teacher.sh on the GPU (guidance sweep on val, test and heldout at 28 steps, the
# 4- and 2-step baselines on both schedules, the training curve).
# Leaves in OUT_DIR: pipeline/ (the teacher, fp32, with its training logs under training/), eval/
# (every evaluation JSON, table.md, training_curve.png), samples/ (the run's sample grids),
# gpu-teacher.json (device, wall time per phase, the headline metrics) and, with SHIP_NAME=shapes-vN,
# assets/ (the 16-bit shipped asset and its registry entry, from `python -m sd35flash.ship`).
# Usage: [SHIP_NAME=shapes-v1] [MACHINE=h200] bench/gpu-teacher.sh [OUT_DIR] [--tiny]
#   --tiny: the smoke preset and a handful of images on the CPU: the same path in seconds (tests).
# Needs a CUDA build of torch (see README, "Set-up"); PYTHON picks the interpreter.
set -euo pipefail
OUT=${1:-runs/gpu-teacher}
shift || true
TINY=0
for a in "$@"; do
  case "$a" in
    --tiny) TINY=1 ;;
    *) echo "gpu-teacher.sh: unknown argument $a (usage: bench/gpu-teacher.sh [OUT_DIR] [--tiny])" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# the run's cache (rendered latents, checkpoints: hundreds of MB) stays outside OUT_DIR
export SD35FLASH_CACHE=${GPU_TEACHER_CACHE:-$(mktemp -d)}
if [ "$TINY" = 1 ]; then
  PRESET=smoke
  EVAL=(--device cpu --n 8 --base-n 4 --val-images 4 --guidances 4 --batch-size 8 --baselines 4-uniform
        --no-progress)
else
  PRESET=teacher-gpu
  EVAL=(--device cuda --n 400 --base-n 400 --val-images 100 --guidances 3,4,5,6 --batch-size 200 --no-progress)
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  fi
fi
t0=$(date +%s)
# --resume: a rerun after a timeout continues from the last checkpoint (GPU_TEACHER_CACHE kept)
timeout "${TRAIN_TIMEOUT:-360}" $PY -m sd35flash pretrain --preset "$PRESET" --out "$OUT/pipeline" --resume --no-progress
t1=$(date +%s)
WORK=$(ls -d "$SD35FLASH_CACHE"/teachers/"$PRESET"-*/work | head -1)
timeout "${EVAL_TIMEOUT:-240}" "$PY" -m sd35flash.evaluate.teacher_table "$OUT/pipeline" "$OUT/eval" --work "$WORK" \
  "${EVAL[@]}"
t2=$(date +%s)
# the training logs travel with the weights (`python -m sd35flash.ship` copies training/ into the asset)
mkdir -p "$OUT/pipeline/training" "$OUT/samples"
cp "$WORK/flow/metrics.jsonl" "$OUT/pipeline/training/flow-metrics.jsonl"
cp "$WORK/vae/metrics.jsonl" "$OUT/pipeline/training/vae-metrics.jsonl"
cp "$WORK"/flow/samples/*.png "$OUT/samples/" 2>/dev/null || true
if [ -n "${SHIP_NAME:-}" ]; then  # the 16-bit asset, ready to copy into src/sd35flash/assets/
  "$PY" -m sd35flash.ship "$OUT/pipeline" --name "$SHIP_NAME" --eval-dir "$OUT/eval" --assets "$OUT/assets" \
    --machine "${MACHINE:-one GPU}" --command "bench/gpu-teacher.sh (sd35flash pretrain --preset $PRESET)"
fi
"$PY" - "$OUT" "$PRESET" "$((t1 - t0))" "$((t2 - t1))" <<'PYEOF'
import json, sys
from pathlib import Path

import torch

out, preset, train_s, eval_s = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
evals = {}
for p in sorted((out / "eval").glob("*.json")):
    r = json.loads(p.read_text())
    if isinstance(r.get("alignment"), dict):
        evals[p.stem] = {"split": r["split"], "steps": r["steps"], "guidance": r["guidance"],
                         "schedule": r["schedule"], "num_images": r["num_images"], "alignment": r["alignment"],
                         "fd_effnet": r.get("fd_effnet")}
res = {"finished": True, "preset": preset,
       "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
       "seconds": {"train": train_s, "eval": eval_s, "total": train_s + eval_s},
       "pipeline": str(out / "pipeline"), "evaluations": evals}
(out / "gpu-teacher.json").write_text(json.dumps(res, indent=1))
t = evals.get("test-28", {})
print(f"gpu-teacher: {res['device']}, train {train_s} s, eval {eval_s} s; test overall "
      f"{t.get('alignment', {}).get('overall')} at guidance {t.get('guidance')}")
PYEOF
echo "wrote $OUT/gpu-teacher.json (run cache: $SD35FLASH_CACHE)"
