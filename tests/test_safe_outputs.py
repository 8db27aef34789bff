"""Outputs are written atomically and never replace a user's files; numbers parse and validate at
the boundary; a finished distillation is exported again without retraining."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd35flash.cli import main
from sd35flash.config import load_config, merge, parse_overrides
from sd35flash.distill.config import DistillConfig, load_distill_config
from sd35flash.errors import ConfigError, UserError
from sd35flash.io import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    check_model_output,
    check_writable_output,
    clean_stale,
    staged_dir,
)
from sd35flash.models.pipeline_io import save_pipeline


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- atomic files and folders


def test_atomic_write_failure_leaves_the_target_and_no_temp_file(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old" and _listing(tmp_path) == ["out.json"]
    with pytest.raises(UserError, match="cannot write"):  # an OSError becomes one line
        atomic_write(target, lambda tmp: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    assert _listing(tmp_path) == ["out.json"]
    atomic_write_text(tmp_path / "new" / "deep" / "a.txt", "x")  # missing parents are created
    assert (tmp_path / "new" / "deep" / "a.txt").read_text() == "x"


def test_json_never_holds_nan(tmp_path):
    with pytest.raises(UserError, match=r"non-finite value nan at alignment\.overall"):
        atomic_write_json(tmp_path / "e.json", {"alignment": {"overall": math.nan}})
    with pytest.raises(UserError, match=r"points\[1\]"):
        atomic_write_json(tmp_path / "e.json", {"points": [1.0, math.inf]})
    assert _listing(tmp_path) == []
    atomic_write_json(tmp_path / "e.json", {"x": 1.5})
    assert json.loads((tmp_path / "e.json").read_text()) == {"x": 1.5}


def test_staged_dir_failure_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "model_index.json").write_text("{}")
    with pytest.raises(RuntimeError), staged_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"0" * 10)
        raise RuntimeError("killed")
    assert _listing(tmp_path) == ["model", "model/model_index.json"]
    with staged_dir(target) as tmp:
        (tmp / "model_index.json").write_text('{"new": 1}')
    assert json.loads((target / "model_index.json").read_text()) == {"new": 1}
    assert _listing(tmp_path) == ["model", "model/model_index.json"]


def test_stale_staging_of_a_killed_run_is_cleaned_but_a_live_writers_is_kept(tmp_path):
    target = tmp_path / "student"
    dead = tmp_path / f".student.tmp-{_dead_pid()}-abcd1234"
    dead_old = tmp_path / f".student.old-{_dead_pid()}-abcd1234"
    live = tmp_path / f".student.tmp-{os.getpid()}-feedbeef"
    foreign = tmp_path / ".student.tmp-notapid"
    for d in (dead, dead_old, live, foreign):
        d.mkdir()
        (d / "weights.bin").write_bytes(b"1")
    assert set(clean_stale(target)) == {dead, dead_old}
    assert live.is_dir() and foreign.is_dir() and not dead.exists() and not dead_old.exists()


def test_output_checks_create_nothing(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "keep.txt").write_text("mine")
    for path, kind, needle in ((tmp_path / "f" / "o.json", "file", "is a file"), (tmp_path / "user", "file", "folder"),
                               (tmp_path / "f", "dir", "is a file"), ("/proc/x/o.json", "file", "system file"),
                               ("/sys/o", "dir", "system file")):
        with pytest.raises(UserError, match=needle):
            check_writable_output(path, kind)
    with pytest.raises(UserError, match="not a model folder"):
        check_model_output(tmp_path / "user")
    assert check_writable_output(tmp_path / "a" / "b" / "c.json") == tmp_path / "a" / "b" / "c.json"
    assert _listing(tmp_path) == ["f", "user", "user/keep.txt"]


def test_save_pipeline_never_replaces_a_users_folder(tiny_pipeline, tmp_path):
    pipe = tiny_pipeline()
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="not a model folder"):
        save_pipeline(pipe, user)
    assert _listing(tmp_path) == ["user", "user/thesis.tex"]
    out = save_pipeline(pipe, tmp_path / "model")
    stale = tmp_path / f".model.tmp-{_dead_pid()}-00000000"  # a save killed half-way
    stale.mkdir()
    save_pipeline(pipe, out, extra_files={"note.txt": "second"})  # a model folder is replaced
    assert (out / "note.txt").read_text() == "second"
    assert not stale.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_merge_and_export_refuse_a_users_folder_and_keep_its_files(tmp_path, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    student = tmp_path / "student"
    student.mkdir()
    assert main(["merge", "--student", str(student), "--ratio", "0.3", "--out", str(user)]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert main(["export", "--model", str(student), "--format", "onnx", "--out", str(user)]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert (user / "notes.txt").read_text() == "keep me" and _listing(tmp_path) == ["student", "user", "user/notes.txt"]


# ----------------------------------------------------------------------------- numbers


def test_exponent_numbers_parse_as_floats(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("student:\n  lr: 1e-4\n  steps: 1e2\nfake:\n  lr: 3E-5\n")
    c = load_config(DistillConfig, cfg)
    assert c.student.lr == pytest.approx(1e-4) and isinstance(c.student.lr, float)
    assert c.student.steps == 100 and isinstance(c.student.steps, int)
    assert c.fake.lr == pytest.approx(3e-5)
    m = merge(load_distill_config("smoke"), parse_overrides(["student.lr=1e-4", "trajectory.lr=2.5e-5"]), "--set")
    assert m.student.lr == pytest.approx(1e-4) and m.trajectory.lr == pytest.approx(2.5e-5)


@pytest.mark.parametrize("override,needle", [
    ("student.steps=-3", "student.steps"), ("student.lr=-1e-4", "student.lr"), ("fake.lr=0", "fake.lr"),
    ("guidance=nan", "finite"), ("guidance=.inf", "finite"), ("guidance=1e30", "guidance"),
    ("runtime.seed=1180591620717411303424", "runtime.seed"), ("student.steps=2.5", "integer"),
    ("t5_dropout=1.5", "t5_dropout"), ("checkpoint_every=0", "checkpoint_every"), ("batch_size=0", "batch_size"),
    ("student.lr=abc", "number"), ("gan.enabled=1e-4", "true or false"),
])
def test_nonsense_config_numbers_are_refused(override, needle):
    with pytest.raises(ConfigError, match=needle):
        merge(load_distill_config("smoke"), parse_overrides([override]), "--set")


def test_every_preset_is_in_range():
    from sd35flash.toy_teacher import PRESETS as PT
    from sd35flash.toy_teacher import load_pretrain_config

    for name in ("smoke", "quick", "default"):
        load_distill_config(name)
    for name in PT:
        load_pretrain_config(name)


# ----------------------------------------------------------------------------- distill: re-export, no retraining


def test_finished_distill_is_exported_again_without_training(smoke_teacher, tmp_path, capsys, monkeypatch):
    from sd35flash.distill import run as distill_run
    from sd35flash.models.student_info import read_student_info
    from sd35flash.paths import cache_root

    base = ["distill", "--teacher", str(smoke_teacher), "--preset", "smoke", "--no-progress",
            "--set", "split.steps=0", "--set", "trajectory.steps=1", "--set", "student.steps=1"]
    works = cache_root() / "distill"
    before = sorted(works.iterdir()) if works.is_dir() else []
    assert main([*base, "--out", "/proc/sd35flash/student"]) == 2  # refused before any work
    assert "system file" in capsys.readouterr().err
    assert (sorted(works.iterdir()) if works.is_dir() else []) == before

    first = tmp_path / "first"
    assert main([*base, "--out", str(first)]) == 0
    capsys.readouterr()
    work = Path(read_student_info(first).extra["work_dir"])
    log = (work / "metrics.jsonl").read_text()

    assert main([*base, "--out", str(first)]) == 0  # the same command again: finished, not "unfinished"
    assert "finished training" in capsys.readouterr().out

    def full_disk(*a, **k):
        raise UserError("cannot write model folder (No space left on device)")

    monkeypatch.setattr(distill_run, "export_student", full_disk)  # the export fails after training
    assert main([*base, "--out", str(tmp_path / "full"), "--from-work", str(work)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "it/s]" not in ln and ln.strip()]  # load bars
    assert len(err) == 1 and f"--from-work {work}" in err[0], err
    monkeypatch.undo()

    second = tmp_path / "second"
    assert main([*base, "--out", str(second), "--from-work", str(work)]) == 0
    assert "without training" in capsys.readouterr().out
    assert (work / "metrics.jsonl").read_text() == log  # no training step was logged
    from safetensors.torch import load_file

    a = load_file(first / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(second / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert main([*base, "--set", "student.lr=2e-4", "--out", str(tmp_path / "x"), "--from-work", str(work)]) == 2
    assert "student.lr" in capsys.readouterr().err  # another config's work folder is refused
