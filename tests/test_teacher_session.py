"""bench/teacher-session.sh: one session of a staged teacher (train with a time limit, snapshot,
evaluate) on the smoke preset, and its refusal of a failed training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_EVAL = ["--n", "4", "--base-n", "2", "--val-images", "2", "--guidances", "4", "--batch-size", "4",
             "--baselines", "4-uniform"]


def test_a_session_snapshots_and_evaluates(smoke_teacher, cache_dir, tmp_path):
    """The smoke run is finished in the test session's cache: the session reuses it (exit 0), then
    snapshots and evaluates it. (Stopping at the time limit is tests/test_stopping.py's.)"""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", SD35FLASH_CACHE=str(cache_dir),
               PYTHONPATH=str(ROOT / "src"))
    out = tmp_path / "session"
    proc = subprocess.run(["bash", "bench/teacher-session.sh", "smoke", str(out), "10m", *TINY_EVAL], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    session = json.loads((out / "session.json").read_text())
    assert session["train_exit"] == 0 and session["train_seconds"] >= 0
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "trained" / "model_index.json").is_file()
    assert (out / "eval" / "test-28.json").is_file() and (out / "eval" / "training_curve.png").is_file()
    assert (out / "eval" / "table.md").read_text().strip() in proc.stdout  # the table is printed
    bad = subprocess.run(["bash", "bench/teacher-session.sh", str(tmp_path / "missing.yaml"), str(tmp_path / "b"),
                          "10m"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "training failed (exit 2)" in bad.stderr
