#!/usr/bin/env bash
# The whole teacher table of docs/RESULTS.md, for a teacher folder or a shipped name, in one process
# (src/sd35flash/evaluate/teacher_table.py): guidance sweep on val at 28 steps; at the best guidance
# test and heldout at 28 steps (400 images each) and the 4- and 2-step baselines on the scheduler's
# own schedule, the students' schedule and METHOD.md's lists; table.md, summary.json and the training
# curve (from WORK_DIR, or the folder's training/ logs).
# Usage: bench/eval_teacher.sh TEACHER OUT_DIR [WORK_DIR] [extra teacher_table arguments, e.g. --device cuda]
set -euo pipefail
T=${1:?teacher folder or shipped name}
R=${2:?output folder}
shift 2
WORK=()
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then WORK=(--work "$1"); shift; fi
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" -m sd35flash.evaluate.teacher_table "$T" "$R" "${WORK[@]}" "$@"
