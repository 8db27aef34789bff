#!/usr/bin/env bash
# Figures for docs/RESULTS.md ("Split-timestep and the ablation table"): one 4-step student per
# row of the ablation, every one the default toy recipe (configs/toy-distill-default.yaml: TG 150,
# DMD + GAN 300, split 100 steps, merge ratio 0.3, seed 0) minus one component:
#   s4-full       the full recipe
#   s4-nosharing  --set dmd.timestep_sharing=false
#   s4-nogan      --set gan.enabled=false
#   s4-notg       --set trajectory.steps=0
#   (without split-timestep: the full run's `presplit` variant, the stage-1 student it started from)
# The full and no-sharing rows reuse the stage 0-1 runs of bench/distill_students.sh (S4_SHARE_WORK,
# S4_RENOISE_WORK: their work folders) through `distill --init-from`, which continues them with
# stage 2 exactly as a straight run would (tests/test_split.py).
# Then: `sd35flash eval` of every row on test and heldout (200 images, seed 0), the full student's
# unmerged and presplit variants, and a merge-ratio sweep of the full student on val.
# Usage: bench/ablation.sh TEACHER_DIR OUT_DIR    (ONLY=train|eval|sweep to run one part)
set -euo pipefail
T=${1:?teacher folder}
R=${2:?output folder}
SD=${SD35FLASH:-.venv/bin/sd35flash}
mkdir -p "$R/students"

train() {  # NAME [distill arguments]
  local name=$1; shift
  [ -f "$R/students/$name/model_index.json" ] && return 0
  local t0=$SECONDS
  "$SD" distill --teacher "$T" --out "$R/students/$name" --student-steps 4 --no-progress "$@" > "$R/$name.distill.log" 2>&1
  echo "{\"wall_seconds\": $((SECONDS - t0))}" > "$R/$name.time.json"
}

evaluate() {  # NAME VARIANT
  local name=$1 variant=$2 tag=$1
  [ "$variant" != merged ] && tag="$1-$variant"
  for split in test heldout; do
    [ -f "$R/$tag-$split.json" ] || "$SD" eval --model "$R/students/$name" --variant "$variant" --split $split \
      --num-images 200 --seed 0 --json "$R/$tag-$split.json"
  done
}

case "${ONLY:-all}" in
  all|train)
    train s4-full --init-from "${S4_SHARE_WORK:?work folder of the s4-share run}"
    train s4-nosharing --set dmd.timestep_sharing=false --init-from "${S4_RENOISE_WORK:?work folder of the s4-renoise run}"
    train s4-nogan --set gan.enabled=false
    train s4-notg --set trajectory.steps=0 ;;&
  all|eval)
    for name in s4-full s4-nosharing s4-nogan s4-notg; do evaluate $name merged; done
    evaluate s4-full unmerged
    evaluate s4-full presplit ;;&
  all|sweep)
    "$SD" merge-sweep --student "$R/students/s4-full" --ratios 0:1:0.1 --split val --out "$R/sweep-full" ;;
  *) ;;
esac
