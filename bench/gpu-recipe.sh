#!/usr/bin/env bash
# The distillation recipe at reference scale on one H100/H200-class GPU (issue 11, item 3): the
# `recipe` preset from the shipped teacher with DMD2/FastGen-sized batches and updates instead of
# the CPU's batch 16 x 300, then the same evaluations as bench/recipe-ablation.sh (test 400 and
# heldout 200 images, image seed 0; the teacher at 28 steps and at 4 steps on the students' schedule)
# on the GPU. Sized to train in about 6 minutes; `distill --time-limit` stops it cleanly at a
# checkpoint, and a rerun with the same GPU_RECIPE_CACHE continues it.
# Leaves in OUT_DIR: student/ (the 4-step student, with sd35flash.json), evals/ (every evaluation
# JSON and grid), metrics.jsonl (the run's training log: gan/d_real, gradvar/*, split*/drift, ...)
# and gpu-recipe.json (device, the reference-scale settings, wall time per phase, headline metrics).
# Usage: [TEACHER=shapes-v3] [STUDENT_STEPS=4] [BATCH=64] [UPDATES=1000] bench/gpu-recipe.sh [OUT_DIR] [--tiny]
#   STUDENT_STEPS=2: split.boundaries [0.875], so that each of the times 1 and 0.75 has its own branch
#   TRAIN_LIMIT=6m (distill --time-limit)  EVAL_TIMEOUT=60 (seconds per evaluation; 0: none)
#   --tiny: the smoke preset, 4 test images, no FD, on the CPU: the same path in a minute (tests).
#   --check: only merge the reference-scale overrides into the preset and print the result (no GPU).
# Needs a CUDA build of torch (see README, "Set-up"); PYTHON picks the interpreter.
set -euo pipefail
OUT=${1:-runs/gpu-recipe}
shift || true
TINY=0
CHECK=0
for a in "$@"; do
  case "$a" in
    --tiny) TINY=1 ;;
    --check) CHECK=1 ;;
    *) echo "gpu-recipe.sh: unknown argument $a (usage: bench/gpu-recipe.sh [OUT_DIR] [--tiny|--check])" >&2
       exit 2 ;;
  esac
done
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
T=${TEACHER:-shapes-v3}
K=${STUDENT_STEPS:-4}
if [ "$TINY" = 1 ]; then
  PRESET=smoke; DEVICE=cpu; NUM_TEST=4; SPLITS="test"
  SCALE=(--set runtime.device=cpu)
  EVAL=(--device cpu --no-fd --batch-size 4); EVAL_TIMEOUT=${EVAL_TIMEOUT:-0}  # 0: no limit
else
  PRESET=recipe; DEVICE=cuda; NUM_TEST=400; NUM_HELDOUT=200; SPLITS="test heldout"
  B=${BATCH:-64}; U=${UPDATES:-1000}
  # reference scale: batch B (CPU: 16), U student updates (CPU: 300), four times the teacher
  # trajectories for a proportionally longer TG stage, a longer fake warm-up and split stage; fewer
  # checkpoints and probes, which would otherwise dominate a GPU step
  SCALE=(--set batch_size="$B" --set trajectory.batch_size="$B" --set trajectory.num_trajectories=1024
         --set trajectory.steps=300 --set student.steps="$U" --set student.warmup=50 --set fake.warmup_steps=100
         --set split.steps=$((U / 3)) --set checkpoint_every=250 --set probe_every=250 --set sample_every=500
         --set grad_variance_every=100)
  EVAL=(--device cuda --batch-size 200); EVAL_TIMEOUT=${EVAL_TIMEOUT:-60}
fi
# a 2-step student's times are 1 and 0.75: the default split boundary (0.5) would leave one branch
# without a step, so each step gets its own branch
[ "$K" = 2 ] && SCALE+=(--set "split.boundaries=[0.875]")
if [ "$CHECK" = 1 ]; then  # the overrides through the same strict merge as `distill --set`
  "$PY" - "$PRESET" "$K" "${SCALE[@]}" <<'PYEOF'
import json, sys

from sd35flash.config import merge, parse_overrides, to_dict
from sd35flash.distill.config import load_distill_config

preset, k, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
cfg = merge(load_distill_config(preset), parse_overrides(args[1::2]), where="--set")
cfg = merge(cfg, {"student_steps": k})
cfg.validate()
cfg.branch_steps(3.0)  # every split branch holds a student time (at SD3's shift)
print(json.dumps(to_dict(cfg)))
PYEOF
  exit 0
fi
if [ "$TINY" = 0 ] && command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
mkdir -p "$OUT/evals" "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
# the run's cache (trajectories, checkpoints) stays outside OUT_DIR
export SD35FLASH_CACHE=${GPU_RECIPE_CACHE:-$(mktemp -d)}
t0=$(date +%s)
rc=0
"$PY" -m sd35flash distill --teacher "$T" --out "$OUT/student" --preset "$PRESET" --student-steps "$K" --resume \
  --time-limit "${TRAIN_LIMIT:-6m}" --no-progress "${SCALE[@]}" > "$OUT/logs/distill.log" 2>&1 || rc=$?
t1=$(date +%s)
WORK=$(ls -d "$SD35FLASH_CACHE"/distill/*/ 2>/dev/null | head -1)
[ -n "$WORK" ] && [ -f "$WORK/metrics.jsonl" ] && cp "$WORK/metrics.jsonl" "$OUT/metrics.jsonl"
if [ "$rc" = 75 ]; then
  echo "gpu-recipe.sh: training stopped at TRAIN_LIMIT; rerun with GPU_RECIPE_CACHE=$SD35FLASH_CACHE to continue" >&2
  exit 75
fi
if [ "$rc" != 0 ]; then echo "gpu-recipe.sh: distill failed (exit $rc); see $OUT/logs/distill.log" >&2; exit "$rc"; fi
evaluate() {  # MODEL TAG [eval arguments]: test and heldout, each under EVAL_TIMEOUT seconds
  local model=$1 tag=$2 split n; shift 2
  for split in $SPLITS; do
    n=$NUM_TEST; [ $split = heldout ] && n=$NUM_HELDOUT
    timeout "$EVAL_TIMEOUT" "$PY" -m sd35flash eval --model "$model" --split $split --num-images "$n" --seed 0 \
      "${EVAL[@]}" "$@" --json "$OUT/evals/$tag.$split.json" >> "$OUT/logs/eval.log" 2>&1 \
      || { echo "gpu-recipe.sh: evaluation $tag.$split failed or ran past ${EVAL_TIMEOUT}s; see $OUT/logs/eval.log" >&2
           return 1; }
  done
}
SCHED=$("$PY" -c 'import sys; from sd35flash.models.student_info import read_student_info as r
print(",".join(repr(float(t)) for t in [*r(sys.argv[1]).timesteps, 0.0]))' "$OUT/student")
evaluate "$OUT/student" "student-$K" --variant merged
evaluate "$OUT/student" "presplit-$K" --variant presplit
evaluate "$T" teacher-28 --steps 28
evaluate "$T" "teacher-$K-students" --schedule "$SCHED"
t2=$(date +%s)
"$PY" - "$OUT" "$DEVICE" "$((t1 - t0))" "$((t2 - t1))" "${SCALE[*]}" <<'PYEOF'
import json, sys
from pathlib import Path

import torch

out, device, train_s, eval_s, scale = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
evals = {}
for p in sorted((out / "evals").glob("*.json")):
    r = json.loads(p.read_text())
    evals[p.stem] = {"num_images": r["num_images"], "steps": r["steps"], "guidance": r["guidance"],
                     "overall": r["alignment"]["overall"], "fd_effnet": r.get("fd_effnet")}
name = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else "cpu"
res = {"device": name, "overrides": scale.split(), "seconds": {"train": train_s, "eval": eval_s},
       "evaluations": evals}
(out / "gpu-recipe.json").write_text(json.dumps(res, indent=1))
for tag, e in evals.items():
    print(f"{tag}: overall {e['overall']:.3f} on {e['num_images']} images, fd_effnet {e['fd_effnet']}")
PYEOF
echo "wrote $OUT/gpu-recipe.json (device $DEVICE; train $((t1 - t0)) s, eval $((t2 - t1)) s)"
