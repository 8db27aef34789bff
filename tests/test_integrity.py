"""Integrity: checkpoint manifests and fallback, the last good checkpoint after an alarm, folder
checksums on model folders, and non-finite samples as errors. Tiny models, in-process."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from sd35flash.checksums import CHECKSUM_FILE, DamagedFileError, check_safetensors, verify_folder
from sd35flash.cli import main
from sd35flash.errors import NonFiniteError, TrainingAlarm, UserError
from sd35flash.evaluate.evaluator import finite_json
from sd35flash.models.pipeline_io import load_pipeline, save_pipeline
from sd35flash.sampling import generate
from sd35flash.train.alarms import CollapseDetector
from sd35flash.train.checkpoint import MANIFEST, CheckpointManager, read_meta

TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"


# -- checkpoints ----------------------------------------------------------------------------------
class Setup:
    """A tiny model, optimiser and collapse detector prepared by accelerate, with a manager."""

    def __init__(self, root, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.acc = Accelerator(cpu=True)
        self.model = torch.nn.Linear(4, 3)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.model, self.opt = self.acc.prepare(self.model, self.opt)
        self.detector = CollapseDetector("probe pixel std", ratio=0.5, patience=2)
        self.acc.register_for_checkpointing(self.detector)
        self.ckpt = CheckpointManager(root)

    def train(self, steps: int, start: int = 0, every: int = 1) -> None:
        for step in range(start + 1, start + steps + 1):
            loss = self.model(torch.randn(2, 4)).pow(2).mean()
            self.acc.backward(loss)
            self.opt.step()
            self.opt.zero_grad()
            if step % every == 0:
                self.ckpt.save(self.acc, step)

    def weights(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in self.model.parameters()])


def _warnings(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def test_manifest_and_exact_resume(tmp_path):
    a = Setup(tmp_path / "a")
    a.train(4)
    names = [p.name for p in a.ckpt.all()]
    assert names == ["ckpt-00000003", "ckpt-00000004"]  # the two newest are kept
    files = json.loads((a.ckpt.all()[-1] / MANIFEST).read_text())["files"]
    assert {"meta.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= set(files)
    assert all(len(rec["sha256"]) == 64 and rec["size"] > 0 for rec in files.values())
    assert read_meta(a.ckpt.all()[-1])["good"] is True
    a.train(2, start=4)
    b = Setup(tmp_path / "a", seed=1)
    shutil.rmtree(tmp_path / "a" / "ckpt-00000006")
    assert b.ckpt.load(b.acc) == 5
    b.train(1, start=5, every=100)
    a2 = Setup(tmp_path / "c")
    a2.train(6, every=100)
    assert torch.equal(a2.weights(), b.weights())  # bit for bit, including the RNG stream


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete-rng", "delete-meta", "bad-manifest"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, capsys, damage):
    s = Setup(tmp_path / "c")
    s.train(2)
    newest = s.ckpt.all()[-1]
    if damage == "truncate":
        p = newest / "model.safetensors"
        p.write_bytes(p.read_bytes()[:-7])
    elif damage == "flip":
        p = newest / "optimizer.bin"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    elif damage == "delete-rng":
        (newest / "random_states_0.pkl").unlink()
    elif damage == "delete-meta":
        (newest / "meta.json").unlink()
    else:
        (newest / MANIFEST).write_text("{not json")
    capsys.readouterr()
    fresh = Setup(tmp_path / "c", seed=3)
    assert fresh.ckpt.load(fresh.acc) == 1
    lines = _warnings(capsys)
    assert len(lines) == 1, lines
    assert "ckpt-00000002 is damaged" in lines[0] and "falling back" in lines[0] and "ckpt-00000001" in lines[0]


def test_no_valid_checkpoint_is_one_line_error(tmp_path):
    s = Setup(tmp_path / "d")
    s.train(2)
    for c in s.ckpt.all():
        (c / "random_states_0.pkl").write_bytes(b"\0" * 10)
    with pytest.raises(UserError) as e:
        Setup(tmp_path / "d").ckpt.load(Accelerator(cpu=True))
    msg = str(e.value)
    assert "\n" not in msg and "no usable checkpoint" in msg and "ckpt-00000002" in msg


def test_checkpoint_without_manifest_loads_with_a_note(tmp_path, capsys):
    s = Setup(tmp_path / "e")
    s.train(2)
    for c in s.ckpt.all():
        (c / MANIFEST).unlink()
    capsys.readouterr()
    fresh = Setup(tmp_path / "e", seed=5)
    assert fresh.ckpt.load(fresh.acc) == 2
    assert torch.equal(fresh.weights(), s.weights())
    lines = _warnings(capsys)
    assert len(lines) == 1 and "no manifest.json" in lines[0], lines
    # an older checkpoint with a truncated RNG state is not resumed silently: it falls back
    rng = s.ckpt.all()[-1] / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:50])
    again = Setup(tmp_path / "e", seed=6)
    assert again.ckpt.load(again.acc) == 1
    assert any("random_states_0.pkl is truncated" in ln and "falling back" in ln for ln in _warnings(capsys))


def test_unrestorable_rng_state_warns(tmp_path, capsys):
    s = Setup(tmp_path / "f")
    s.train(1)
    capsys.readouterr()
    path = s.ckpt.all()[-1]
    fresh = Setup(tmp_path / "f", seed=7)
    (path / "random_states_0.pkl").rename(path / "random_states_9.pkl")
    (path / MANIFEST).unlink()  # an older checkpoint whose RNG file is for another process
    assert fresh.ckpt.load(fresh.acc, path) == 1
    lines = _warnings(capsys)
    assert any("no RNG state for process 0" in ln and "not bit-exact" in ln for ln in lines), lines


def test_last_good_checkpoint_after_divergence(tmp_path):
    s = Setup(tmp_path / "g")
    s.train(2)
    with torch.no_grad():
        s.model.weight.mul_(1e10)  # diverged but finite: the case that used to be "last good"
    s.train(1, start=2)
    assert read_meta(s.ckpt.all()[-1])["good"] is False
    with torch.no_grad():
        s.model.weight.fill_(float("nan"))
    s.train(1, start=3)
    s.train(1, start=4)
    assert [p.name for p in s.ckpt.all()] == ["ckpt-00000002", "ckpt-00000004", "ckpt-00000005"]  # good one kept
    assert s.ckpt.last_good().name == "ckpt-00000002"
    alarm = s.ckpt.alarm(TrainingAlarm("teacher loss became nan at step 5; training stopped"))
    assert "teacher loss became nan" in str(alarm) and "the last good checkpoint is" in str(alarm)
    assert "ckpt-00000002 (step 2)" in str(alarm)
    assert [p.name for p in s.ckpt.all()] == ["ckpt-00000002"]  # the diverged ones are set aside, not deleted
    assert (tmp_path / "g" / "ckpt-00000004.diverged").is_dir()
    assert CheckpointManager(tmp_path / "g").latest().name == "ckpt-00000002"


def test_unhealthy_probe_makes_a_checkpoint_not_good(tmp_path):
    s = Setup(tmp_path / "h")
    s.detector.update(0, 1.0)
    s.train(1)
    s.detector.update(1, 0.1)  # one bad probe, below patience: no alarm yet
    s.train(1, start=1)
    assert read_meta(s.ckpt.all()[0])["good"] and not read_meta(s.ckpt.all()[1])["good"]
    with pytest.raises(TrainingAlarm) as e:
        s.detector.update(2, 0.1)
    alarm = s.ckpt.alarm(e.value)
    assert "samples collapsed" in str(alarm) and "ckpt-00000001 (step 1)" in str(alarm)
    with pytest.raises(TrainingAlarm, match="NaN/inf samples"):
        CollapseDetector("probe pixel std").update(3, float("nan"))
    none = CheckpointManager(tmp_path / "empty").alarm(NonFiniteError("model produced non-finite latents"))
    assert "training stopped: model produced non-finite latents" in str(none) and "no good checkpoint" in str(none)


# -- model folders ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """An untrained smoke-size pipeline saved by sd35flash."""
    from sd35flash.models.toy import build_vae
    from sd35flash.toy_teacher import load_pretrain_config
    from sd35flash.pretrain.flow_trainer import build_teacher_pipeline

    cfg = load_pretrain_config("smoke")
    torch.manual_seed(0)
    pipe = build_teacher_pipeline(cfg, build_vae(cfg.model))
    return save_pipeline(pipe, tmp_path_factory.mktemp("tiny") / "model")


def _copy(folder, dest):
    shutil.copytree(folder, dest)
    return dest


def test_saved_folder_has_sha256sum_checksums(tiny_folder):
    lines = (tiny_folder / CHECKSUM_FILE).read_text().splitlines()
    assert any(ln.endswith("  " + TRANSFORMER) for ln in lines) and any("model_index.json" in ln for ln in lines)
    if shutil.which("sha256sum"):
        res = subprocess.run(["sha256sum", "--quiet", "-c", CHECKSUM_FILE], cwd=tiny_folder, capture_output=True)
        assert res.returncode == 0, res.stdout
    assert verify_folder(tiny_folder) is True
    load_pipeline(tiny_folder)


def test_damaged_weights_are_one_line_errors(tiny_folder, tmp_path, capsys):
    flipped = _copy(tiny_folder, tmp_path / "flipped")
    p = flipped / TRANSFORMER
    data = bytearray(p.read_bytes())
    data[-100:] = np.random.default_rng(0).integers(0, 256, 100, dtype=np.uint8).tobytes()  # header intact
    p.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match=f"{TRANSFORMER} is damaged"):
        load_pipeline(flipped)
    assert main(["generate", "a red circle", "--model", str(flipped), "--out", str(tmp_path / "x.png")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and TRANSFORMER in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "x.png").exists()
    # without a checksum file (a stock folder) a truncated safetensors is still named
    stock = _copy(tiny_folder, tmp_path / "stock")
    (stock / CHECKSUM_FILE).unlink()
    load_pipeline(stock)
    q = stock / "vae" / "diffusion_pytorch_model.safetensors"
    q.write_bytes(q.read_bytes()[:-10])
    with pytest.raises(DamagedFileError, match="vae/diffusion_pytorch_model.safetensors is truncated"):
        load_pipeline(stock)
    with pytest.raises(DamagedFileError, match="truncated"):
        check_safetensors(q)
    missing = _copy(tiny_folder, tmp_path / "missing")
    (missing / "vae" / "config.json").unlink()
    with pytest.raises(DamagedFileError, match="vae/config.json is missing"):
        load_pipeline(missing)


def test_own_edits_keep_checksums_valid(tiny_folder, tmp_path):
    from sd35flash.models.student_info import StudentInfo, read_student_info, write_student_info

    folder = _copy(tiny_folder, tmp_path / "edited")
    write_student_info(folder, StudentInfo(timesteps=[1.0, 0.5], steps=2))
    assert "sd35flash.json" in (folder / CHECKSUM_FILE).read_text()
    assert verify_folder(folder) and read_student_info(folder).steps == 2
    (folder / "sd35flash.json").write_text((folder / "sd35flash.json").read_text().replace("0.5", "0.25"))
    with pytest.raises(DamagedFileError, match="sd35flash.json is damaged"):
        verify_folder(folder)


def test_non_finite_samples_are_errors(tiny_folder, tmp_path, capsys):
    pipe = load_pipeline(tiny_folder)
    sched = [1.0, 0.5, 0.0]
    assert generate(pipe, ["a red circle"], [0], sched).dtype == np.uint8
    for g in (float("nan"), float("inf")):
        with pytest.raises(UserError, match="guidance must be a finite number"):
            generate(pipe, ["a red circle"], [0], sched, guidance=g)
    with torch.no_grad():
        pipe.transformer.proj_out.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="non-finite latents .*'a blue square'"):
        generate(pipe, ["a blue square", "a red circle"], [0, 1], sched)
    # a NaN model saved with valid checksums: generate fails with one line and writes no PNG
    bad = save_pipeline(pipe, tmp_path / "nan-model")
    out = tmp_path / "img.png"
    capsys.readouterr()
    assert main(["generate", "a red circle", "--model", str(bad), "--out", str(out), "--steps", "2"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "Loading" not in ln]
    assert len(err) == 1 and "non-finite" in err[0] and str(bad) in err[0], err
    assert not out.exists()


def test_evaluation_json_never_holds_nan(capsys):
    res = finite_json({"alignment": {"overall": float("nan"), "count": 0.5}, "fd": [1.0, float("inf")]})
    assert res == {"alignment": {"overall": None, "count": 0.5}, "fd": [1.0, None]}
    json.dumps(res, allow_nan=False)
    err = capsys.readouterr().err
    assert "alignment.overall is nan" in err and "fd[1] is inf" in err
