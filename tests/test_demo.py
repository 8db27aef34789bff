"""`sd35flash demo --preset smoke`: the whole chain end to end (teacher, 4-step student with
split-timestep branches, 2-step student, six evaluations, report)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sd35flash.cli import main
from sd35flash.models.student_info import read_student_info

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["teacher-28step", "teacher-4step", "student-4step", "student-4step-unmerged", "student-4step-presplit",
          "student-2step"]


def test_demo_smoke_end_to_end(smoke_teacher, tmp_path, monkeypatch):
    """The demo distils a shipped teacher named with --teacher (the smoke teacher shipped in fp16)."""
    from sd35flash.ship import ship

    folder = ship(str(smoke_teacher), "smoke-v1", root=tmp_path / "assets", guidance=4.0, check_prompts=1)
    monkeypatch.setenv("SD35FLASH_ASSETS", str(tmp_path / "assets"))
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "smoke", "--teacher", "smoke-v1", "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.html").read_text()
    table = report.split("<h2>Metrics</h2>")[1].split("</table>")[0]
    side = report.split("<h2>Side by side")[1].split("</table>")[0]
    for name in MODELS:  # every model in the metrics table and in the side-by-side comparison
        assert f"<td>{name}</td>" in table, name
        assert f"<th>{name}</th>" in side, name
    assert len(re.findall(r"<img class='cmp", side)) == len(MODELS) * 8
    for png in ("categories.png", "alignment_vs_nfe.png", "loss_curves.png"):
        assert (out / png).stat().st_size > 0
    demo = json.loads((out / "demo.json").read_text())
    assert list(demo["results"]) == MODELS
    nfe = {k: r["nfe_per_image"] for k, r in demo["results"].items()}
    assert nfe == {"teacher-28step": 56, "teacher-4step": 8, "student-4step": 4, "student-4step-unmerged": 4,
                   "student-4step-presplit": 4, "student-2step": 2}
    r = demo["results"]
    assert r["student-4step-unmerged"]["transformer_bytes"] == 2 * r["student-4step"]["transformer_bytes"]
    assert r["teacher-28step"]["model"] == str(folder) and r["teacher-28step"]["guidance"] == 4.0
    assert read_student_info(out / "student-4step").split is not None
    # the fair few-step baseline: the teacher with CFG on the 4-step student's own schedule
    sched4 = [*read_student_info(out / "student-4step").timesteps, 0.0]
    assert r["teacher-4step"]["schedule"] == pytest.approx(sched4)
    assert r["teacher-4step"]["guidance"] > 1.0
    two = read_student_info(out / "student-2step")
    assert two.split is None and two.steps == 2

    # bench/oracle-study.sh rates the demo's models with simulated annotators (2 prompts, 1 seed)
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(["bash", "bench/oracle-study.sh", str(out), str(tmp_path / "oracle"), "2", "1", "3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "oracle" / "study" / "manifest.json").read_text())
    assert sorted(manifest["models"]) == ["student2", "student4", "student4-unmerged", "teacher28", "teacher4"]
    assert manifest["models"]["teacher4"]["schedule"] == pytest.approx(sched4)
    oracle = json.loads((tmp_path / "oracle" / "oracle.json").read_text())
    assert set(oracle["models"]) == set(manifest["models"]) and oracle["votes"] > 0
    assert read_student_info(tmp_path / "oracle" / "student4-unmerged").split.unmerged
