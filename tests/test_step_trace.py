"""The per-step sampler trace: its last step is the sampler's output; bad schedules are user errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sd35flash.errors import UserError
from sd35flash.evaluate.step_trace import main, parse_schedule, single_object_specs, summarise, trace
from sd35flash.models.pipeline_io import load_pipeline
from sd35flash.sampling import generate
from sd35flash.world import canonical_prompt


def test_last_step_is_the_sampler_output(smoke_teacher):
    pipe = load_pipeline(str(smoke_teacher))
    specs = single_object_specs(3)
    assert [s.category for s in specs] == ["single_object"] * 3
    seeds = [7, 8, 9]
    schedule = [1.0, 0.75, 0.5, 0.0]
    imgs = trace(pipe, pipe.transformer, specs, seeds, schedule, guidance=3.0)
    assert imgs.shape[:2] == (3, 3)
    ref = generate(pipe, [canonical_prompt(s) for s in specs], seeds, schedule, guidance=3.0)
    assert np.abs(imgs[-1].astype(int) - ref.astype(int)).max() <= 1
    summary = summarise(imgs, specs, schedule)
    assert [r["t"] for r in summary["steps"]] == [1.0, 0.75, 0.5]
    assert all(0.0 <= r["share_extra"] <= 1.0 for r in summary["steps"])


def test_cli_writes_json_and_strip(smoke_teacher, tmp_path):
    out = tmp_path / "t.json"
    rc = main(["--model", str(smoke_teacher), "--schedule", "1,0.5,0", "--num", "2", "--json", str(out),
               "--png", str(tmp_path / "s.png")])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["num_images"] == 2 and len(data["steps"]) == 2
    assert (tmp_path / "s.png").stat().st_size > 0


@pytest.mark.parametrize("bad", ["1,0.5", "0.5,1,0", "1,nan,0", "1,x,0", "2,0", "1"])
def test_bad_schedules(bad):
    with pytest.raises(UserError):
        parse_schedule(bad)
