"""bench/gpu.sh at toy size on the CPU (--tiny): the code path the GPU run takes, and its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_tiny_on_cpu_writes_json(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    cmd = ["bash", str(ROOT / "bench" / "gpu.sh"), str(out), "--tiny", "--device", "cpu", "--dtype", "float32",
           "--resolutions", "32", "--teacher-steps", "4", "--repeats", "1", "--warmup", "0"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["finished"] and res["device"] == "cpu" and res["architecture"] == "tiny"
    row = res["resolutions"]["32"]
    for name, steps in (("student", 4), ("teacher", 4)):
        r = row[name]
        assert r["steps"] == steps and r["seconds_per_image"] > 0 and r["transformer_seconds_per_step"] > 0
        assert r["peak_memory_gib"] > 0 and r["planned_peak_gib"] > 0
        assert row["no_t5"][name]["planned_peak_gib"] < r["planned_peak_gib"]  # T5 weights gone
    assert row["teacher"]["guidance"] > 1 and row["student"]["guidance"] == 1.0
    assert row["precisions"]["int8"]["seconds_per_image"] > 0
    assert "compute capability" in row["precisions"]["fp8"]["error"]  # recorded, not fatal
    laptop = row["laptop_8bit_no_t5"]  # int8 transformer, no T5: the planner predicts less than bf16 with T5
    assert laptop["peak_memory_gib"] > 0 and 0 < laptop["planned_peak_gib"] < row["student"]["planned_peak_gib"]
    assert res["params"]["transformer"] > 0 and res["params"]["text_encoder_3"] > 0
