"""bench/gpu-distill.sh at toy size on the CPU (--tiny): the code path the GPU run takes, and its JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_distill_bench_tiny_on_cpu_writes_json(tmp_path):
    out = tmp_path / "distill.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    cmd = ["bash", str(ROOT / "bench" / "gpu-distill.sh"), str(out), "--tiny", "--device", "cpu", "--dtype", "float32",
           "--steps", "1", "--lora-rank", "4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["finished"] and res["device"] == "cpu" and res["architecture"] == "tiny"
    lora, full = res["settings"]["lora"], res["settings"]["full"]
    for row in (lora, full):
        assert row["seconds_per_step"] > 0 and all(math.isfinite(v) for v in row["losses"].values())
        assert row["peak_memory_gib"] is None and row["planned_peak_gib"] > 0  # no allocator peak on a CPU
        # what is resident after the steps (weights, AdamW moments, EMA) is what the plan says
        assert abs(row["resident_gib"] - row["planned_resident_gib"]) <= 0.02 * row["planned_resident_gib"], row
    assert lora["plan_setup"]["mode"] == "lora" and full["plan_setup"]["gradient_checkpointing"]
    assert lora["planned_resident_gib"] < full["planned_resident_gib"]  # one base vs three copies
