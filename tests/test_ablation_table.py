"""The seeded ablation table (`sd35flash.evaluate.ablation`) and its driver `bench/recipe-ablation.sh`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from sd35flash.errors import UserError
from sd35flash.evaluate.ablation import collect, main, summarise, welch_interval
from sd35flash.models.student_info import read_student_info

ROOT = Path(__file__).resolve().parents[1]


def _eval(overall: float, fd: float = 100.0, n: int = 400) -> dict:
    return {"num_images": n, "alignment": {"overall": overall, "two_objects": overall / 2, "relation": 0.0},
            "fd_effnet": fd}


def test_welch_interval_by_hand():
    """d = 0.32 - 0.41; s_a^2 = 4e-4, s_b^2 = 7e-4 over 3 seeds each: se = sqrt(4e-4/3 + 7e-4/3) = 0.019149,
    Welch df = 3.7231, half-width t(0.975, 3.7231) * se = 0.05476; scipy's Welch test gives the same interval."""
    a, b = [0.30, 0.34, 0.32], [0.40, 0.44, 0.39]
    e = welch_interval(a, b)
    assert e["effect"] == pytest.approx(-0.09)
    assert e["se"] == pytest.approx(0.019149, abs=1e-6)
    assert e["df"] == pytest.approx(3.7231, abs=1e-4)
    assert e["low"] == pytest.approx(-0.09 - 0.05476, abs=1e-5)
    assert e["high"] == pytest.approx(-0.09 + 0.05476, abs=1e-5)
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (e["low"], e["high"]) == pytest.approx((ref.low, ref.high))
    assert e["significant"] is True
    # overlapping seeds: not significant; one seed: no interval at all
    assert welch_interval([0.30, 0.36, 0.33], [0.32, 0.35, 0.30])["significant"] is False
    assert welch_interval([0.3], b)["low"] is None


def test_table_from_files(tmp_path, capsys):
    """Rows, seeds and splits come from the file names; each row's effect is against `full`;
    a stray file is ignored, the outputs are written and the markdown marks n.s. rows."""
    ev = tmp_path / "evals"
    ev.mkdir()
    scores = {"full": [0.40, 0.44, 0.42], "nogan": [0.41, 0.43, 0.45], "notg": [0.30, 0.31, 0.29]}
    for row, xs in scores.items():
        for seed, x in enumerate(xs):
            (ev / f"{row}.s{seed}.test.json").write_text(json.dumps(_eval(x)))
    (ev / "full.s0.heldout.json").write_text(json.dumps(_eval(0.35, n=200)))
    (ev / "notes.json").write_text("{}")
    runs = collect(ev)
    assert set(runs) == {"full", "nogan", "notg"} and sorted(runs["full"]["test"]) == [0, 1, 2]
    table = summarise(runs)
    full = table["rows"]["full"]["test"]["metrics"]["overall"]
    assert full["mean"] == pytest.approx(0.42) and full["std"] == pytest.approx(0.02)
    assert "vs_reference" not in full
    notg = table["rows"]["notg"]["test"]["metrics"]["overall"]["vs_reference"]
    assert notg["effect"] == pytest.approx(-0.12) and notg["significant"] is True
    assert table["rows"]["nogan"]["test"]["metrics"]["overall"]["vs_reference"]["significant"] is False
    assert table["rows"]["full"]["heldout"]["metrics"]["overall"]["std"] is None
    assert main([str(ev), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "ablation.md").read_text()
    assert "| nogan | 3 | 400 |" in md and "n.s." in md and "(1 seed)" in md
    assert json.loads((tmp_path / "out" / "ablation.json").read_text())["reference"] == "full"
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 1000


def test_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="no <row>.s<seed>.<split>.json"):
        collect(tmp_path)
    (tmp_path / "nogan.s0.test.json").write_text(json.dumps(_eval(0.3)))
    with pytest.raises(UserError, match="reference row 'full' has no evaluations; rows: nogan"):
        summarise(collect(tmp_path))
    (tmp_path / "full.s0.test.json").write_text("{not json")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "full.s0.test.json is not a readable evaluation JSON" in err


def test_recipe_ablation_script_on_the_smoke_teacher(smoke_teacher, tmp_path):
    """bench/recipe-ablation.sh --tiny: the full row with two training seeds (different students), which
    also yields `nosplit` (its presplit student); the teacher references; the collected table; a rerun
    finds everything done; an unknown row is refused before any work."""
    env = dict(os.environ, PYTHON=sys.executable, SD35FLASH=str(Path(sys.executable).parent / "sd35flash"),
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), ROWS="full", SEEDS="0 1", SPLITS="test")
    out = tmp_path / "abl"
    cmd = ["bash", "bench/recipe-ablation.sh", "--tiny", str(smoke_teacher), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in (out / "evals").glob("*.json"))
    assert names == sorted([f"{r}.s{s}.test.json" for r in ("full", "nosplit") for s in (0, 1)]
                          + ["ablation.json"])
    assert {p.name for p in (out / "reference").glob("*.json")} == {"teacher-28.test.json",
                                                                   "teacher-4-students.test.json"}
    four = json.loads((out / "reference" / "teacher-4-students.test.json").read_text())
    student = read_student_info(out / "students" / "full.s0")
    assert four["schedule"] == pytest.approx([*student.timesteps, 0.0]) and four["guidance"] > 1
    assert json.loads((out / "evals" / "nosplit.s1.test.json").read_text())["variant"] == "presplit"
    w = [(out / "students" / f"full.s{s}" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
         for s in (0, 1)]
    assert w[0] != w[1]  # runtime.seed reached the run
    table = json.loads((out / "evals" / "ablation.json").read_text())
    assert table["rows"]["nosplit"]["test"]["seeds"] == [0, 1]
    assert "vs_reference" in table["rows"]["nosplit"]["test"]["metrics"]["overall"]
    assert not any((out / "locks").iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in (out / "logs").iterdir()}
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in (out / "logs").iterdir()}
    assert after == before  # nothing trained or evaluated again
    bad = subprocess.run(cmd, cwd=ROOT, env=dict(env, ROWS="full nosuchrow"), capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown row 'nosuchrow'" in bad.stderr


def test_tg_scaling_script_on_the_smoke_teacher(smoke_teacher, tmp_path):
    """bench/tg-scaling.sh --tiny: a TG-only student per budget (no DMD, warm-up or split steps, the
    asked number of TG steps and trajectories) and its eval; a rerun is a no-op."""
    env = dict(os.environ, PYTHON=sys.executable, SD35FLASH=str(Path(sys.executable).parent / "sd35flash"),
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), BUDGETS="2x4")
    out = tmp_path / "tg"
    cmd = ["bash", "bench/tg-scaling.sh", "--tiny", str(smoke_teacher), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "tg2-n4-test.json").read_text())
    assert res["num_images"] == 4 and res["steps"] == 4
    cfg = read_student_info(out / "students" / "tg2-n4").extra["config"]
    assert (cfg["trajectory"]["steps"], cfg["trajectory"]["num_trajectories"]) == (2, 4)
    assert (cfg["student"]["steps"], cfg["fake"]["warmup_steps"], cfg["split"]["steps"]) == (0, 0, 0)
    before = (out / "tg2-n4-test.json").stat().st_mtime_ns
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300).returncode == 0
    assert (out / "tg2-n4-test.json").stat().st_mtime_ns == before


def test_distill_scaling_script_makes_every_point_of_a_batch_from_one_run(smoke_teacher, tmp_path):
    """bench/distill_scaling.sh --tiny: budgets 1x2 and 2x2 come from ONE run of 2 updates that kept
    its checkpoint after 1 (student.keep_at), exported as snapshots; each is evaluated, gets a wall
    time from the run's log, and the curve is collected; a rerun trains nothing."""
    env = dict(os.environ, PYTHON=sys.executable, SD35FLASH=str(Path(sys.executable).parent / "sd35flash"),
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), SETS="--set dmd.noise=fresh")
    out = tmp_path / "scaling"
    cmd = ["bash", "bench/distill_scaling.sh", "--tiny", str(smoke_teacher), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "students").iterdir()) == ["run-b2"]
    cfg = read_student_info(out / "students" / "run-b2").extra["config"]
    assert (cfg["student"]["steps"], cfg["student"]["keep_at"], cfg["split"]["steps"]) == (2, [1, 2], 0)
    assert cfg["dmd"]["noise"] == "fresh"  # SETS reached the run
    snaps = [read_student_info(out / "snapshots" / "b2" / f"u{s}").extra["snapshot"]["student_updates"]
             for s in (1, 2)]
    assert snaps == [1, 2]
    res = json.loads((out / "scaling.json").read_text())
    assert [(p["student_updates"], p["batch_size"]) for p in res["points"]] == [(1, 2), (2, 2)]
    walls = [p["wall_seconds"] for p in res["points"]]
    assert 0 < walls[0] < walls[1]
    assert res["teacher"]["overall"] is not None and (out / "scaling.png").stat().st_size > 0
    before = (out / "students" / "run-b2" / "model_index.json").stat().st_mtime_ns
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300).returncode == 0
    assert (out / "students" / "run-b2" / "model_index.json").stat().st_mtime_ns == before


def test_scaling_wall_time_sums_the_sessions_of_a_resumed_run(tmp_path):
    """--wall: the metrics' `time` restarts in each session; the time to step N is the sum of each
    session's last logged time at or before N (stage 1 starts after trajectory + fake warm-up steps)."""
    from sd35flash.config import merge, to_dict
    from sd35flash.distill.config import load_distill_config

    cfg = merge(load_distill_config("smoke"), {"trajectory": {"steps": 2}, "fake": {"warmup_steps": 1}})
    (tmp_path / "config.json").write_text(json.dumps({"config": to_dict(cfg)}))
    rows = [(1, 5.0), (2, 9.0), (3, 14.0), (4, 20.0),  # session 1 stops after step 4
            (4, 3.0), (5, 8.0), (6, 12.0)]  # session 2 redoes step 4 from the checkpoint at 3
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time": t}) + "\n" for s, t in rows))
    script = ROOT / "bench" / "distill_scaling.py"

    def wall(n):
        run = subprocess.run([sys.executable, str(script), "--wall", str(tmp_path), str(n)], capture_output=True,
                             text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)["wall_seconds"]

    assert wall(1) == 23.0  # step 4 = 2 + 1 + 1: session 1's 20 s, plus session 2's redone step 4 (spent too)
    assert wall(2) == 28.0  # step 5: 20 + 8
    assert wall(3) == 32.0
