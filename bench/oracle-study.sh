#!/usr/bin/env bash
# The oracle study of docs/STUDY.md on the models of a finished `sd35flash demo` run: the teacher at
# 28 steps and at 4 steps (CFG; on the 4-step student's own schedule, the fair few-step baseline, as
# in the demo), the 4-step student merged and unmerged, and the 2-step student, rated by
# simulated annotators that prefer the image the shapes-world judge accepts (random otherwise).
# Every model draws the same test specs with the same seeds; the study folder is resumable.
# Usage: bench/oracle-study.sh DEMO_DIR OUT_DIR [NUM_PROMPTS [SEEDS [ANNOTATORS]]]
#   e.g. bench/oracle-study.sh runs/demo runs/oracle 100 2 200
# Writes OUT_DIR/study (images, manifest, votes), OUT_DIR/oracle.json, OUT_DIR/oracle.html and
# OUT_DIR/session.json (wall time of the image generation).
set -euo pipefail
D=${1:?demo output folder (sd35flash demo --out)}
O=${2:?output folder}
NP=${3:-100}
SEEDS=${4:-2}
ANN=${5:-200}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
[ -f "$D/demo.json" ] || { echo "oracle-study.sh: $D/demo.json not found: run sd35flash demo first" >&2; exit 2; }
# the demo's own record names its teacher and students; the 4-step student's merge weights
models=$("$PY" -c '
import json, sys
from pathlib import Path
from sd35flash.models.student_info import read_student_info
d = json.loads((Path(sys.argv[1]) / "demo.json").read_text())
m = {k: v["model"] for k, v in d["results"].items()}
info = read_student_info(m["student-4step"])
split = info.split
if split is None:
    sys.exit("oracle-study.sh: the demo'"'"'s 4-step student has no split-timestep branches to unmerge")
if split.unmerged:
    sys.exit("oracle-study.sh: the demo'"'"'s 4-step student samples unmerged by default; expected the merged one")
print(m["teacher-28step"], m["student-4step"], m["student-2step"], ",".join(map(str, split.merge_weights)),
      ",".join(repr(float(t)) for t in [*info.timesteps, 0.0]))
' "$D")
read -r T S4 S2 W SCHED4 <<< "$models"
mkdir -p "$O"
# the same student with each step routed to its own branch
[ -d "$O/student4-unmerged" ] || "$PY" -m sd35flash merge --student "$S4" --weights "$W" --unmerged \
  --out "$O/student4-unmerged"
t0=$(date +%s)
"$PY" -m sd35flash study create --model teacher28="$T":28 --model teacher4="$T" --schedule teacher4="$SCHED4" \
  --model student4="$S4" --model student4-unmerged="$O/student4-unmerged" --model student2="$S2" \
  --prompts shapes --num-prompts "$NP" --seeds "$SEEDS" --out "$O/study" --no-progress
t1=$(date +%s)
"$PY" -m sd35flash study oracle "$O/study" --annotators "$ANN"
"$PY" -m sd35flash study results "$O/study" --json "$O/oracle.json" --html "$O/oracle.html"
echo "{\"create_seconds\": $((t1 - t0)), \"num_prompts\": $NP, \"seeds\": $SEEDS, \"annotators\": $ANN}" \
  > "$O/session.json"
