#!/usr/bin/env bash
# One working session of the shapes teacher's staged training on a machine that may not keep its
# cache: train a `pretrain` preset (a stage) until it finishes or TIME_LIMIT passes (then it stops
# at a step end with a checkpoint, exit 75), take its EMA pipeline (`pretrain --snapshot`: the
# finished one, or the newest checkpoint's, with the training logs of this stage and of the stages it
# continues) and evaluate it (bench/eval_teacher.sh; its curve spans the whole chain). Whether to
# ship is decided by reading OUT_DIR/eval/table.md; shipping is
# `python -m sd35flash.ship OUT_DIR/pipeline --name shapes-vN --eval-dir OUT_DIR/eval ...`.
# Usage: bench/teacher-session.sh PRESET|CONFIG.yaml OUT_DIR TIME_LIMIT [extra eval_teacher arguments]
#   e.g. bench/teacher-session.sh teacher-3 runs/t3 110m --guidances 4,5 --base-n 100
# A rerun with the same cache continues the stage (--resume) instead of starting it over.
set -euo pipefail
P=${1:?pretrain preset or config file}
R=${2:?output folder}
LIMIT=${3:?time limit, e.g. 110m}
shift 3
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$R"
case "$P" in
  *.yaml|*.yml) SRC=(--config "$P") ;;
  *) SRC=(--preset "$P") ;;
esac
t0=$(date +%s)
rc=0
"$PY" -m sd35flash pretrain "${SRC[@]}" --out "$R/trained" --resume --time-limit "$LIMIT" --no-progress \
  >> "$R/train.log" 2>&1 || rc=$?
if [ "$rc" != 0 ] && [ "$rc" != 75 ]; then
  echo "teacher-session.sh: training failed (exit $rc); see $R/train.log" >&2
  exit "$rc"
fi
t1=$(date +%s)
# the EMA pipeline with its training/ logs (and, under training/init/, those of the stages it
# continues): the finished run's, or the newest checkpoint's
rm -rf "$R/pipeline"
"$PY" -m sd35flash pretrain "${SRC[@]}" --snapshot "$R/pipeline"
# the training curve comes from the pipeline's training/ logs: the whole chain of stages
bench/eval_teacher.sh "$R/pipeline" "$R/eval" --no-progress "$@"
t2=$(date +%s)
echo "{\"preset\": \"$P\", \"train_exit\": $rc, \"train_seconds\": $((t1 - t0)), \"eval_seconds\": $((t2 - t1))}" \
  > "$R/session.json"
cat "$R/eval/table.md"
