"""Teacher baselines: `eval --schedule`, the training curve, the teacher table's argument checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sd35flash import flow
from sd35flash.cli import main
from sd35flash.errors import UserError
from sd35flash.evaluate.evaluator import parse_schedule
from sd35flash.evaluate.teacher_table import teacher_table
from sd35flash.evaluate.training_curve import curves
from sd35flash.evaluate.training_curve import main as curve_main
from sd35flash.models.pipeline_io import load_pipeline
from sd35flash.sampling import generate, scheduler_schedule
from sd35flash.toy_teacher import load_pretrain_config, teacher_dir
from sd35flash.world import canonical_prompt, split_specs


@pytest.mark.parametrize("text, why", [("1,0.5", "last time must be 0"), ("0.5,0.9,0", "strictly descending"),
                                       ("1,a,0", "comma-separated numbers"), ("2,1,0", "in [0, 1]"),
                                       ("0", "at least two"), ("1,1,0", "strictly descending")])
def test_bad_schedules_are_refused(text, why):
    with pytest.raises(UserError, match=why.replace("[", r"\[").replace("]", r"\]")):
        parse_schedule(text)


def test_bad_schedule_fails_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", "shapes-v9", "--schedule", "1,0.5", "--split", "test", "--json",
              str(tmp_path / "e.json")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "last time must be 0" in err and "shapes-v9" not in err


def test_eval_samples_on_the_given_schedule(smoke_teacher, tmp_path):
    pipe = load_pipeline(smoke_teacher)
    specs = split_specs("test", 2, seed=0)
    prompts = [canonical_prompt(s) for s in specs]
    cases = [(["--schedule", "1,0.75,0"], [1.0, 0.75, 0.0]),
             (["--steps", "4", "--schedule", "uniform"], flow.sampling_schedule(4, 3.0)),
             (["--steps", "4", "--schedule", "scheduler"], scheduler_schedule(pipe, 4))]
    for i, (extra, sched) in enumerate(cases):
        out = tmp_path / f"e{i}.json"
        imgs = tmp_path / f"imgs{i}"
        assert main(["eval", "--model", str(smoke_teacher), *extra, "--split", "test", "--num-images", "2",
                     "--no-fd", "--json", str(out), "--save-images", str(imgs)]) == 0
        res = json.loads(out.read_text())
        assert res["schedule"] == pytest.approx(sched) and res["steps"] == len(sched) - 1
        assert res["nfe_per_image"] == 2 * (len(sched) - 1)
        want = generate(pipe, prompts, [0, 1], sched, guidance=res["guidance"])
        got = np.stack([np.asarray(Image.open(imgs / f"{k:05d}.png").convert("RGB")) for k in range(2)])
        assert np.abs(want.astype(int) - got.astype(int)).max() <= 1
    assert main(["eval", "--model", str(smoke_teacher), "--steps", "3", "--schedule", "1,0.5,0", "--split", "test",
                 "--num-images", "2", "--json", str(tmp_path / "x.json")]) == 2


def test_training_curve_from_a_run(smoke_teacher, tmp_path, capsys):
    work = teacher_dir(load_pretrain_config("smoke"), "smoke") / "work"
    png = tmp_path / "curve.png"
    assert curve_main([str(work), str(png), "--json", str(tmp_path / "curve.json")]) == 0
    assert Image.open(png).size[0] > 500
    data = json.loads((tmp_path / "curve.json").read_text())["curves"]
    assert "probe/overall" in data and "flow/loss" in data and "probe/pixel_std" not in data
    assert curve_main([str(tmp_path), str(tmp_path / "x.png")]) == 2
    assert "holds no training metrics" in capsys.readouterr().err


def test_training_curve_keeps_the_last_value_of_a_resumed_step():
    rows = [{"step": 25, "flow/loss": 0.9}, {"step": 50, "flow/loss": 0.8}, {"step": 50, "probe/overall": 0.1},
            {"step": 25, "flow/loss": 0.7}, {"step": 50, "flow/loss": 0.6}]  # resumed from step 0
    got = curves(rows)
    assert got["flow/loss"] == [(25, 0.7), (50, 0.6)] and got["probe/overall"] == [(50, 0.1)]


def test_teacher_table_refuses_unknown_baselines(tmp_path):
    with pytest.raises(UserError, match="unknown baselines 8-uniform"):
        teacher_table("unused", tmp_path, baselines=("8-uniform",))
