#!/usr/bin/env bash
# Scaling curve of the distillation recipe: alignment against student updates x batch.
# For every budget S x B in BUDGETS, distil the recipe preset (configs/toy-distill-recipe.yaml, or
# PRESET) with --set student.steps=S --set batch_size=B, evaluate the student on `test` (NUM_IMAGES,
# default 400, seed 0), then collect scaling.json + scaling.png (bench/distill_scaling.py); the
# teacher's own eval (28 steps, its CFG) is the reference line. Finished runs are skipped.
# Usage: bench/distill_scaling.sh [--tiny] TEACHER_DIR OUT_DIR
#   BUDGETS="100x16 300x16 1000x16 300x64" (default) NUM_IMAGES=400 PRESET=recipe
#   --tiny: smoke preset, budgets 1x2 2x2, 4 images, no FD: a seconds-long check of the plumbing.
set -euo pipefail
TINY=0
if [ "${1:-}" = "--tiny" ]; then TINY=1; shift; fi
T=${1:?teacher folder}
R=${2:?output folder}
SD=${SD35FLASH:-.venv/bin/sd35flash}
PY=${PYTHON:-.venv/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
if [ $TINY = 1 ]; then
  BUDGETS=${BUDGETS:-"1x2 2x2"}; NUM_IMAGES=${NUM_IMAGES:-4}; PRESET=${PRESET:-smoke}; EXTRA=(--no-fd)
  SET=(--set split.steps=0 --set trajectory.steps=1)
else
  BUDGETS=${BUDGETS:-"100x16 300x16 1000x16 300x64"}; NUM_IMAGES=${NUM_IMAGES:-400}; PRESET=${PRESET:-recipe}
  EXTRA=(); SET=()
fi
mkdir -p "$R/students"

[ -f "$R/teacher-test.json" ] || "$SD" eval --model "$T" --split test --num-images "$NUM_IMAGES" --seed 0 \
  "${EXTRA[@]}" --json "$R/teacher-test.json" > "$R/teacher.eval.log" 2>&1

for budget in $BUDGETS; do
  s=${budget%x*}; b=${budget#*x}; name="s$s-b$b"
  if [ ! -f "$R/students/$name/model_index.json" ]; then
    t0=$SECONDS
    "$SD" distill --teacher "$T" --out "$R/students/$name" --preset "$PRESET" --student-steps 4 --no-progress \
      "${SET[@]}" --set student.steps="$s" --set batch_size="$b" > "$R/$name.distill.log" 2>&1
    echo "{\"wall_seconds\": $((SECONDS - t0))}" > "$R/$name.time.json"
  fi
  [ -f "$R/$name-test.json" ] || "$SD" eval --model "$R/students/$name" --split test --num-images "$NUM_IMAGES" \
    --seed 0 "${EXTRA[@]}" --json "$R/$name-test.json" > "$R/$name.eval.log" 2>&1
done
"$PY" "$HERE/distill_scaling.py" "$R" --teacher-json "$R/teacher-test.json"
