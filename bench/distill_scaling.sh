#!/usr/bin/env bash
# Scaling curve of the distillation recipe: alignment against student updates x batch (issue 11,
# item 2). Budgets of one batch size share ONE run: for batch B, the recipe preset (or PRESET) runs
# stage 1 for the largest S of that batch, with no stage 2 (--set split.steps=0), and keeps its
# checkpoints after every other S (--set student.keep_at=[...]); the EMA student after each S
# updates is exported from them (python -m sd35flash.distill.snapshot). The student's LR is constant
# after its warm-up, so each snapshot is the student a run of S updates ends with. Every snapshot is
# evaluated on the same NUM_IMAGES `test` images (seed 0), and bench/distill_scaling.py collects
# scaling.json + scaling.png, with the teacher's own eval (28 steps, its CFG) as the reference line.
# A point's wall time is the run's logged compute time up to that step. Finished work is skipped;
# TIME_LIMIT (a `distill --time-limit`) stops a run at a checkpoint (exit 75) and a rerun resumes it.
# Usage: bench/distill_scaling.sh [--tiny] TEACHER OUT_DIR
#   BUDGETS="75x16 150x16 300x16 600x16" (default) NUM_IMAGES=400 PRESET=recipe TIME_LIMIT=
#   SETS="--set dmd.noise=fresh ..." (more `distill --set` overrides for every run)
#   --tiny: smoke preset, budgets 1x2 2x2, 4 images, no FD: a check of the plumbing.
set -euo pipefail
TINY=0
if [ "${1:-}" = "--tiny" ]; then TINY=1; shift; fi
T=${1:?teacher folder or shipped name}
R=${2:?output folder}
SD=${SD35FLASH:-.venv/bin/sd35flash}
PY=${PYTHON:-.venv/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
if [ $TINY = 1 ]; then
  BUDGETS=${BUDGETS:-"1x2 2x2"}; NUM_IMAGES=${NUM_IMAGES:-4}; PRESET=${PRESET:-smoke}; EXTRA=(--no-fd)
  SET=(--set trajectory.steps=1)
else
  BUDGETS=${BUDGETS:-"75x16 150x16 300x16 600x16"}; NUM_IMAGES=${NUM_IMAGES:-400}; PRESET=${PRESET:-recipe}
  EXTRA=(); SET=()
fi
LIMIT=()
[ -n "${TIME_LIMIT:-}" ] && LIMIT=(--time-limit "$TIME_LIMIT")
read -ra USER_SET <<< "${SETS:-}"
mkdir -p "$R/students" "$R/snapshots" "$R/logs"

for b in $(for x in $BUDGETS; do echo "${x#*x}"; done | sort -un); do
  steps=$(for x in $BUDGETS; do [ "${x#*x}" = "$b" ] && echo "${x%x*}"; done | sort -n)
  max=$(echo "$steps" | tail -1)
  keep="[$(echo $steps | tr ' ' ',')]"
  run="$R/students/run-b$b"
  if [ ! -f "$run/model_index.json" ]; then
    rc=0
    "$SD" distill --teacher "$T" --out "$run" --preset "$PRESET" --student-steps 4 --no-progress --resume \
      "${LIMIT[@]}" "${SET[@]}" "${USER_SET[@]}" --set split.steps=0 --set student.steps="$max" --set batch_size="$b" \
      --set student.keep_at="$keep" >> "$R/logs/run-b$b.distill.log" 2>&1 || rc=$?
    if [ $rc = 75 ]; then echo "distill_scaling.sh: run-b$b stopped at its time limit; rerun to continue" >&2
                          exit 75; fi
    [ $rc = 0 ] || { echo "distill_scaling.sh: run-b$b failed (exit $rc); see $R/logs/run-b$b.distill.log" >&2
                     exit $rc; }
  fi
  work=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["extra"]["work_dir"])' "$run/sd35flash.json")
  # shellcheck disable=SC2086
  "$PY" -m sd35flash.distill.snapshot "$work" --updates $steps --out-dir "$R/snapshots/b$b" \
    >> "$R/logs/run-b$b.snapshot.log" 2>&1
  for s in $steps; do
    name="s$s-b$b"
    [ -f "$R/$name-test.json" ] || "$SD" eval --model "$R/snapshots/b$b/u$s" --split test \
      --num-images "$NUM_IMAGES" --seed 0 "${EXTRA[@]}" --json "$R/$name-test.json" > "$R/logs/$name.eval.log" 2>&1
    "$PY" "$HERE/distill_scaling.py" --wall "$work" "$s" > "$R/$name.time.json"
  done
done
[ -f "$R/teacher-test.json" ] || "$SD" eval --model "$T" --split test --num-images "$NUM_IMAGES" --seed 0 \
  "${EXTRA[@]}" --json "$R/teacher-test.json" > "$R/logs/teacher.eval.log" 2>&1
"$PY" "$HERE/distill_scaling.py" "$R" --teacher-json "$R/teacher-test.json"
