#!/usr/bin/env bash
# Evaluate a teacher the way docs/RESULTS.md reports it: a guidance sweep on `val` (28 steps,
# 100 images), then at the best guidance: test and heldout at 28 steps and test at 4 steps
# (200 images each, seed 0).
# Usage: bench/eval_teacher.sh TEACHER_DIR OUT_DIR
set -euo pipefail
T=${1:?teacher folder}
R=${2:?output folder}
SD=${SD35FLASH:-.venv/bin/sd35flash}
mkdir -p "$R"
for g in 2 4 6; do
  "$SD" eval --model "$T" --steps 28 --guidance $g --split val --num-images 100 --seed 0 --no-fd --json "$R/val-g$g.json"
done
BEST=$(python3 -c "
import json, sys
r = {g: json.load(open(f'$R/val-g{g}.json'))['alignment']['overall'] for g in (2, 4, 6)}
print(max(r, key=r.get))")
echo "best guidance on val: $BEST"
"$SD" eval --model "$T" --steps 28 --guidance "$BEST" --split test --num-images 200 --seed 0 --json "$R/test-28.json"
"$SD" eval --model "$T" --steps 28 --guidance "$BEST" --split heldout --num-images 200 --seed 0 --json "$R/heldout-28.json"
"$SD" eval --model "$T" --steps 4 --guidance "$BEST" --split test --num-images 200 --seed 0 --json "$R/test-4.json"
