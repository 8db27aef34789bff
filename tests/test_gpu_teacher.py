"""bench/gpu-teacher.sh --tiny: the GPU teacher script's whole path (train, evaluate, ship) on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_teacher_tiny_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", GPU_TEACHER_CACHE=str(tmp_path / "cache"),
               SHIP_NAME="tiny-v1", MACHINE="test cpu", PYTHONPATH=str(ROOT / "src"))
    env.pop("SD35FLASH_ASSETS", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu-teacher.sh"), str(out), "--tiny"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "gpu-teacher.json").read_text())
    assert res["finished"] and res["preset"] == "smoke" and res["device"] == "cpu"
    assert res["seconds"]["train"] > 0 and res["seconds"]["total"] >= res["seconds"]["train"]
    ev = res["evaluations"]
    assert set(ev) == {"val-28-g4", "test-28", "heldout-28", "test-4-uniform"}
    assert ev["test-28"]["num_images"] == 8 and ev["heldout-28"]["split"] == "heldout"
    assert ev["test-4-uniform"]["schedule"] == [1.0, 0.9, 0.75, 0.5, 0.0]  # smoke teacher: shift 3
    assert ev["test-28"]["fd_effnet"] > 0
    assert (out / "eval" / "training_curve.png").is_file() and (out / "eval" / "table.md").is_file()
    assert (out / "pipeline" / "model_index.json").is_file()
    assert (out / "pipeline" / "training" / "flow-metrics.jsonl").is_file()
    shipped = out / "assets" / "teachers" / "tiny-v1"
    assert (shipped / "checksums.sha256").is_file() and "test cpu" in (shipped / "README.md").read_text()
    (entry,) = json.loads((out / "assets" / "models.json").read_text())["models"]
    assert entry["name"] == "tiny-v1" and entry["guidance"] == 4.0
    bad = subprocess.run(["bash", str(ROOT / "bench" / "gpu-teacher.sh"), str(out), "--tinny"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument --tinny" in bad.stderr
