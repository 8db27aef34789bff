#!/usr/bin/env bash
# Trajectory guidance (stage 0) alone at several budgets: how good a 4-step student does TG make, and
# does it pay to spend more of the budget there (issue 11, item 2: "spend the budget where it pays")?
# For every STEPSxTRAJECTORIES in BUDGETS: the recipe preset (or PRESET) with no fake warm-up, no
# DMD/GAN and no split stage (--set student.steps=0 fake.warmup_steps=0 split.steps=0), STEPS TG
# updates at the preset's batch on TRAJECTORIES cached teacher trajectories; each student is
# evaluated on the same NUM_IMAGES `test` images (seed 0). Finished runs are skipped; a bank of
# trajectories is built once per size and cached. Output: OUT/tg<S>-n<N>-test.json (+ .time.json).
# Usage: bench/tg-scaling.sh [--tiny] TEACHER OUT_DIR
#   BUDGETS="150x256 600x256 600x1024 1500x1024" NUM_IMAGES=400 PRESET=recipe SEED=0
#   --tiny: smoke preset, budgets 2x4 4x8, 4 images, no FD: a check of the plumbing.
set -euo pipefail
TINY=0
if [ "${1:-}" = "--tiny" ]; then TINY=1; shift; fi
T=${1:?teacher folder or shipped name}
R=${2:?output folder}
SD=${SD35FLASH:-.venv/bin/sd35flash}
SEED=${SEED:-0}
if [ $TINY = 1 ]; then
  BUDGETS=${BUDGETS:-"2x4 4x8"}; NUM_IMAGES=${NUM_IMAGES:-4}; PRESET=${PRESET:-smoke}; EXTRA=(--no-fd --batch-size 4)
else
  BUDGETS=${BUDGETS:-"150x256 600x256 600x1024 1500x1024"}; NUM_IMAGES=${NUM_IMAGES:-400}; PRESET=${PRESET:-recipe}
  EXTRA=()
fi
mkdir -p "$R/students" "$R/logs"
for budget in $BUDGETS; do
  s=${budget%x*}; n=${budget#*x}; name="tg$s-n$n"
  [ "$SEED" = 0 ] || name="$name-s$SEED"
  if [ ! -f "$R/students/$name/model_index.json" ]; then
    t0=$SECONDS
    "$SD" distill --teacher "$T" --out "$R/students/$name" --preset "$PRESET" --student-steps 4 --no-progress \
      --resume --set student.steps=0 --set fake.warmup_steps=0 --set split.steps=0 --set trajectory.steps="$s" \
      --set trajectory.num_trajectories="$n" --set runtime.seed="$SEED" > "$R/logs/$name.distill.log" 2>&1 \
      || { echo "tg-scaling.sh: $name failed; see $R/logs/$name.distill.log" >&2; exit 1; }
    echo "{\"wall_seconds\": $((SECONDS - t0))}" > "$R/$name.time.json"
  fi
  [ -f "$R/$name-test.json" ] || "$SD" eval --model "$R/students/$name" --split test --num-images "$NUM_IMAGES" \
    --seed 0 "${EXTRA[@]}" --json "$R/$name-test.json" > "$R/logs/$name.eval.log" 2>&1
  echo "tg-scaling.sh: $name done"
done
