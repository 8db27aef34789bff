"""Snapshots of one distillation run (issue 11, item 2: the points of a scaling curve from one run):
``student.keep_at`` keeps stage-1 checkpoints, ``sd35flash.distill.snapshot`` exports the EMA
student at each, and the snapshot at the last update is the run's own student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from sd35flash.config import merge
from sd35flash.distill import run as distill_run
from sd35flash.distill.config import load_distill_config
from sd35flash.distill.snapshot import export_snapshot, main
from sd35flash.errors import ConfigError, UserError
from sd35flash.models.student_info import read_student_info
from sd35flash.train.checkpoint import CheckpointManager


def _cfg(**student):
    # smoke: trajectory 2 steps, no fake warm-up; 3 stage-1 updates, no stage 2
    return merge(load_distill_config("smoke"), {"split": {"steps": 0}, "student": {"steps": 3, **student}})


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def kept_run(smoke_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("snap") / "student"
    distill_run.distill(_cfg(keep_at=[1]), str(smoke_teacher), out, progress=False)
    work = Path(json.loads((out / "sd35flash.json").read_text())["extra"]["work_dir"])
    return out, work


def test_keep_at_keeps_the_stage_1_checkpoints_it_names(kept_run):
    _, work = kept_run
    steps = [CheckpointManager.step_of(p) for p in CheckpointManager(work / "checkpoints").all()]
    assert steps == [_cfg().stage1_step(1), _cfg().stage1_step(3)] == [3, 5]  # the rest were pruned


def test_snapshots_export_the_ema_student_after_n_updates(kept_run, tmp_path, capsys):
    out, work = kept_run
    assert main([str(work), "--updates", "1", "3", "--out-dir", str(tmp_path / "snaps")]) == 0
    first, last = tmp_path / "snaps" / "u1", tmp_path / "snaps" / "u3"
    end, one, own = _state(last), _state(first), _state(out)
    assert all(torch.equal(end[k], own[k]) for k in own)  # the last snapshot is the run's own student
    assert any(not torch.equal(one[k], own[k]) for k in own)  # two more updates moved it
    info = read_student_info(first)
    assert info.extra["snapshot"] == {"student_updates": 1, "batch_size": 4, "checkpoint_step": 3}
    assert info.timesteps == read_student_info(out).timesteps
    pipe = StableDiffusion3Pipeline.from_pretrained(str(first))  # a standard student folder
    assert pipe.transformer is not None
    # a rerun keeps what is there
    assert main([str(work), "--updates", "1", "--out-dir", str(tmp_path / "snaps")]) == 0
    assert "kept" in capsys.readouterr().out


def test_snapshot_errors_name_what_to_do(kept_run, tmp_path, capsys):
    _, work = kept_run
    with pytest.raises(UserError, match="no checkpoint after 2 stage-1 updates"):
        export_snapshot(work, 2, tmp_path / "u2")
    with pytest.raises(UserError, match="outside this run's stage 1"):
        export_snapshot(work, 9, tmp_path / "u9")
    assert main([str(tmp_path), "--updates", "1", "--out-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a distillation work folder" in err[0]
    assert not (tmp_path / "u2").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("keep", [[0], [4]])
def test_keep_at_outside_stage_1_is_a_config_error(keep):
    with pytest.raises(ConfigError, match=r"student\.keep_at"):
        _cfg(keep_at=keep).validate()
