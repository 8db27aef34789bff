#!/usr/bin/env bash
# Figures for docs/RESULTS.md ("Distillation"): from one teacher, with stages 0-1 of the default
# toy recipe (configs/toy-distill-default.yaml with split.steps=0) and the same seed and budget for
# every run:
#   s4-share    4-step student, timestep sharing (the default)
#   s4-renoise  4-step student, vanilla DMD re-noising (--set dmd.timestep_sharing=false)
#   s2-share    2-step student, timestep sharing
# The teacher's CFG inside distillation is the recipe's (`guidance: 4.0`); TEACHER_GUIDANCE (the best
# on val, bench/eval_teacher.sh) is used for the speed comparison. Then `sd35flash eval` of each on test and heldout (200 images, seed 0, guidance 1.0), the gradient
# variance of both estimators at each 4-step run's final checkpoint (16 minibatches), and the
# back-to-back speed of the 4-step student against the 28-step CFG teacher.
# Usage: bench/distill_students.sh TEACHER_DIR OUT_DIR [TEACHER_GUIDANCE]
# Each distillation pins itself to one core when CORE_<NAME> is set (e.g. CORE_s4_share=0), so two
# runs can share a 2-core machine without the thread contention that slows both (docs/RESULTS.md).
set -euo pipefail
T=${1:?teacher folder}
R=${2:?output folder}
G=${3:-4}
SD=${SD35FLASH:-.venv/bin/sd35flash}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$R/students"

run() {  # NAME STEPS [--set ...]
  local name=$1 steps=$2; shift 2
  local core_var="CORE_${name//-/_}" pin=()
  [ -n "${!core_var:-}" ] && pin=(taskset -c "${!core_var}")
  local t0=$SECONDS
  "${pin[@]}" "$SD" distill --teacher "$T" --out "$R/students/$name" --student-steps "$steps" \
    --set split.steps=0 --no-progress "$@" > "$R/$name.distill.log" 2>&1
  echo "{\"wall_seconds\": $((SECONDS - t0))}" > "$R/$name.time.json"
  for split in test heldout; do
    "${pin[@]}" "$SD" eval --model "$R/students/$name" --split $split --num-images 200 --seed 0 \
      --json "$R/$name-$split.json"
  done
}

case "${ONLY:-all}" in
  all|s4-share) run s4-share 4 ;;&
  all|s4-renoise) run s4-renoise 4 --set dmd.timestep_sharing=false ;;&
  all|s2-share) run s2-share 2 ;;&
  all|variance)
    for name in s4-share s4-renoise; do
      work=$(grep -m1 -o "work folder .*" "$R/$name.distill.log" | cut -d' ' -f3)
      "$PY" -m sd35flash.distill.grad_variance --work "$work" --batches 16 --json "$R/$name-gradvar.json"
    done ;;&
  all|speed)
    "$PY" bench/speed_ratio.py --teacher "$T" --student "$R/students/s4-share" --teacher-steps 28 --guidance "$G" \
      --json "$R/speed.json" ;;
  *) ;;
esac
