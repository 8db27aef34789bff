"""bench/gpu-recipe.sh: the reference-scale recipe script's path on the CPU (--tiny), and its GPU
overrides checked against the recipe preset (--check), so a typo cannot waste a lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sd35flash.models.student_info import read_student_info

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "bench" / "gpu-recipe.sh")


def _env(**extra) -> dict:
    return dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), **extra)


def test_gpu_recipe_overrides_are_valid_recipe_keys(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path / "o"), "--check"], cwd=ROOT, env=_env(BATCH="128"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = json.loads(proc.stdout)
    assert cfg["batch_size"] == 128 and cfg["trajectory"]["batch_size"] == 128
    assert cfg["student"]["steps"] == 1000 and cfg["split"]["steps"] == 333
    assert cfg["gan"]["real"] == "renders" and cfg["dmd"]["tau"] == "below"  # still the recipe
    assert not (tmp_path / "o").exists()  # --check writes nothing
    two = subprocess.run(["bash", SCRIPT, str(tmp_path / "o"), "--check"], cwd=ROOT, env=_env(STUDENT_STEPS="2"),
                         capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-2000:]
    cfg2 = json.loads(two.stdout)  # times 1 and 0.75: one split branch each
    assert cfg2["student_steps"] == 2 and cfg2["split"]["boundaries"] == [0.875]
    bad = subprocess.run(["bash", SCRIPT, str(tmp_path / "o"), "--tiniest"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument --tiniest" in bad.stderr


def test_gpu_recipe_tiny_on_cpu(smoke_teacher, tmp_path):
    out = tmp_path / "out"
    env = _env(TEACHER=str(smoke_teacher), GPU_RECIPE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(["bash", SCRIPT, str(out), "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "gpu-recipe.json").read_text())
    assert res["device"] == "cpu" and res["seconds"]["train"] > 0
    ev = res["evaluations"]
    assert set(ev) == {f"{m}.test" for m in ("student-4", "presplit-4", "teacher-28", "teacher-4-students")}
    assert ev["teacher-28.test"]["steps"] == 28 and ev["student-4.test"]["num_images"] == 4
    four = json.loads((out / "evals" / "teacher-4-students.test.json").read_text())
    assert four["schedule"] == pytest.approx([*read_student_info(out / "student").timesteps, 0.0])
    assert json.loads((out / "evals" / "presplit-4.test.json").read_text())["variant"] == "presplit"
    assert (out / "metrics.jsonl").stat().st_size > 0
