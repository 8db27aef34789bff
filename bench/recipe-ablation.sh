#!/usr/bin/env bash
# The seeded ablation table of the distillation recipe (issue 11, item 4): every row is the recipe
# preset (configs/toy-distill-recipe.yaml, or PRESET) with one component taken out, trained with
# each training seed in SEEDS (`--set runtime.seed=N`) and evaluated on the same specs and image
# seeds (test NUM_TEST images, heldout NUM_HELDOUT, `sd35flash eval --seed 0`):
#   full         the recipe
#   nosharing    --set dmd.timestep_sharing=false
#   line         --set dmd.noise=line: DMD read on the student's own line (the paper's sharing: no
#                fresh noise) instead of the recipe's fresh noise at the shared tau
#   nosplit      no run of its own: the full run's stage-1 student (`--variant presplit`)
#   nogan        --set gan.enabled=false
#   gan-teacher  the GAN's real side from NUM_REAL teacher samples instead of renders
#   notg         --set trajectory.steps=0
# plus the teacher references (28 steps with its CFG; 4 steps with CFG on the students' schedule).
# Each (row, seed) is one task behind a lock, so two instances, one per core, share the queue:
#   OMP_NUM_THREADS=1 taskset -c 0 bench/recipe-ablation.sh T R &
#   OMP_NUM_THREADS=1 taskset -c 1 bench/recipe-ablation.sh T R &
# Finished tasks are skipped on a rerun. The evaluation JSONs (a few kB each) land in OUT_DIR/evals/
# as <row>.s<seed>.<split>.json: keep that folder (e.g. under docs/results/) to carry a table across
# machines, then `python -m sd35flash.evaluate.ablation OUT_DIR/evals` writes ablation.{json,md,png}.
# Usage: bench/recipe-ablation.sh [--tiny] TEACHER OUT_DIR
#   ROWS="full nosharing line gan-teacher nogan notg" SEEDS="0 1 2" SPLITS="test heldout" NUM_TEST=400 NUM_HELDOUT=200
#   PRESET=recipe NUM_REAL=256 TIME_LIMIT= (a `distill --time-limit` per run; a stopped run resumes on the next call)
#   --tiny: the smoke preset, 4 images, no FD: a check of the plumbing in about a minute.
set -euo pipefail
TINY=0
if [ "${1:-}" = "--tiny" ]; then TINY=1; shift; fi
T=${1:?teacher folder or shipped name}
R=${2:?output folder}
SD=${SD35FLASH:-.venv/bin/sd35flash}
PY=${PYTHON:-.venv/bin/python}
ROWS=${ROWS:-"full nosharing line gan-teacher nogan notg"}
SEEDS=${SEEDS:-"0 1 2"}
SPLITS=${SPLITS:-"test heldout"}
LAST=${SPLITS##* }  # a task is done when its last split is evaluated
if [ $TINY = 1 ]; then
  PRESET=${PRESET:-smoke}; NUM_TEST=${NUM_TEST:-4}; NUM_HELDOUT=${NUM_HELDOUT:-4}; NUM_REAL=${NUM_REAL:-8}
  EVAL_EXTRA=(--no-fd --batch-size 4)
else
  PRESET=${PRESET:-recipe}; NUM_TEST=${NUM_TEST:-400}; NUM_HELDOUT=${NUM_HELDOUT:-200}; NUM_REAL=${NUM_REAL:-256}
  EVAL_EXTRA=()
fi
LIMIT=()
[ -n "${TIME_LIMIT:-}" ] && LIMIT=(--time-limit "$TIME_LIMIT")
mkdir -p "$R/students" "$R/evals" "$R/reference" "$R/logs" "$R/locks"

overrides() {  # ROW -> the --set arguments that take its component out
  case "$1" in
    full) ;;
    nosharing) echo "--set dmd.timestep_sharing=false --set dmd.tau=next --set dmd.noise=line" ;;  # they need sharing
    line) echo "--set dmd.noise=line" ;;
    nogan) echo "--set gan.enabled=false" ;;
    gan-teacher) echo "--set gan.real=teacher --set gan.num_real=$NUM_REAL" ;;
    notg) echo "--set trajectory.steps=0" ;;
    nosplit) echo "nosplit is the full run's presplit variant; it has no run of its own" >&2; return 1 ;;
    *) echo "recipe-ablation.sh: unknown row '$1' (rows: full nosharing line nosplit nogan gan-teacher notg)" >&2
       return 1 ;;
  esac
}

claim() {  # a lock per task; a lock whose process is gone is taken over
  local lock="$R/locks/$1"
  if mkdir "$lock" 2>/dev/null; then echo $$ > "$lock/pid"; return 0; fi
  local pid
  pid=$(cat "$lock/pid" 2>/dev/null || true)
  if [ -n "$pid" ] && [ "$pid" != $$ ] && kill -0 "$pid" 2>/dev/null; then return 1; fi
  echo $$ > "$lock/pid"
}

release() { rm -rf "$R/locks/$1"; }

for row in $ROWS; do [ "$row" = nosplit ] || overrides "$row" > /dev/null; done  # an unknown row fails here

evaluate() {  # MODEL TAG [eval arguments]: test and heldout JSONs of one model
  local model=$1 tag=$2; shift 2
  local split n
  for split in $SPLITS; do
    n=$NUM_TEST; [ $split = heldout ] && n=$NUM_HELDOUT
    [ -f "$R/evals/$tag.$split.json" ] || "$SD" eval --model "$model" --split $split --num-images "$n" --seed 0 \
      "${EVAL_EXTRA[@]}" "$@" --json "$R/evals/$tag.$split.json" >> "$R/logs/$tag.eval.log" 2>&1
  done
}

# the teacher references: 28 steps, and 4 steps on the students' own schedule (read from the first
# finished student, so that the two differ only by distillation)
teacher_refs() {  # STUDENT_DIR
  local split n sched
  sched=$("$PY" -c 'import sys; from sd35flash.models.student_info import read_student_info as r
print(",".join(repr(float(t)) for t in [*r(sys.argv[1]).timesteps, 0.0]))' "$1")
  for split in $SPLITS; do
    n=$NUM_TEST; [ $split = heldout ] && n=$NUM_HELDOUT
    [ -f "$R/reference/teacher-28.$split.json" ] || "$SD" eval --model "$T" --split $split --num-images "$n" \
      --seed 0 --steps 28 "${EVAL_EXTRA[@]}" --json "$R/reference/teacher-28.$split.json" \
      >> "$R/logs/teacher.eval.log" 2>&1
    [ -f "$R/reference/teacher-4-students.$split.json" ] || "$SD" eval --model "$T" --split $split \
      --num-images "$n" --seed 0 --schedule "$sched" "${EVAL_EXTRA[@]}" \
      --json "$R/reference/teacher-4-students.$split.json" >> "$R/logs/teacher.eval.log" 2>&1
  done
}

for seed in $SEEDS; do
  for row in $ROWS; do
    [ "$row" = nosplit ] && continue  # made with the full row
    tag="$row.s$seed"
    if [ -f "$R/evals/$tag.$LAST.json" ] && { [ "$row" != full ] || [ -f "$R/evals/nosplit.s$seed.$LAST.json" ]; }
    then continue; fi
    claim "$tag" || continue
    # shellcheck disable=SC2046
    set -- $(overrides "$row")
    if [ ! -f "$R/students/$tag/model_index.json" ]; then
      t0=$SECONDS
      rc=0
      "$SD" distill --teacher "$T" --out "$R/students/$tag" --preset "$PRESET" --student-steps 4 --no-progress \
        --resume "${LIMIT[@]}" --set runtime.seed="$seed" "$@" > "$R/logs/$tag.distill.log" 2>&1 || rc=$?
      if [ $rc = 75 ]; then echo "recipe-ablation.sh: $tag stopped at its time limit; rerun to continue" >&2
                            release "$tag"; exit 75; fi
      if [ $rc != 0 ]; then echo "recipe-ablation.sh: $tag failed (exit $rc); see $R/logs/$tag.distill.log" >&2
                           release "$tag"; exit $rc; fi
      echo "{\"wall_seconds\": $((SECONDS - t0))}" > "$R/logs/$tag.time.json"
    fi
    evaluate "$R/students/$tag" "$tag" --variant merged
    [ "$row" = full ] && evaluate "$R/students/$tag" "nosplit.s$seed" --variant presplit
    release "$tag"
    if [ ! -f "$R/reference/teacher-4-students.$LAST.json" ] && claim teacher; then
      teacher_refs "$R/students/$tag"
      release teacher
    fi
  done
done
"$PY" -m sd35flash.evaluate.ablation "$R/evals" --reference full
