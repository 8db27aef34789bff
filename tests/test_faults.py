"""Fault injection on the real CLI: ``kill -9`` at named points of ``sd35flash pretrain`` and
``sd35flash distill`` (the ``SD35FLASH_FAULT_KILL_AT`` test hook, :mod:`sd35flash.faults`, makes the
subprocess send itself SIGKILL), damaged newest checkpoints between the resumes, and a bit-for-bit
comparison of the final weights with one uninterrupted run (in process). Each chain kills, damages and
resumes the same run several times, so one reference run serves every kill point.

Also the last good checkpoint after a diverging distillation (in-process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sd35flash.checksums import read_checksums
from sd35flash.faults import ENV

SRC = str(Path(__file__).resolve().parents[1] / "src")

# the smoke model with fewer, shorter stages; a checkpoint every 2 steps
PRETRAIN_YAML = """\
model: {vae_block_out_channels: [8, 16, 16], latent_channels: 4, num_layers: 1, num_attention_heads: 2,
        attention_head_dim: 16, clip_hidden: 16, clip_layers: 2, clip_heads: 2, t5_d_model: 32, t5_layers: 1,
        t5_heads: 2}
vae: {steps: 4, batch_size: 8, num_images: 32, checkpoint_every: 2, eval_images: 10}
flow: {steps: 8, batch_size: 8, warmup: 2, num_images: 32, checkpoint_every: 2, sample_every: 100, probe_every: 0}
"""
DISTILL = ["--preset", "smoke", "--set", "checkpoint_every=1"]  # stages 2 + 2 + 2 steps


def _cli(args: list[str], cache: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SD35FLASH_CACHE": str(cache), "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop(ENV, None)
    if kill:
        env[ENV] = kill
    return subprocess.run([sys.executable, "-m", "sd35flash", *args, "--no-progress"], env=env, capture_output=True,
                          text=True, timeout=900)


def _in_process(args: list[str], cache: Path) -> None:
    """``sd35flash ARGS`` run by ``main`` in this process on one thread, as ``_cli`` runs it without a kill:
    the uninterrupted reference runs, which need no process of their own."""
    import torch

    from sd35flash.cli import main

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SD35FLASH_CACHE", str(cache))
        mp.delenv(ENV, raising=False)
        torch.set_num_threads(1)
        try:
            assert main([*args, "--no-progress"]) == 0
        finally:
            torch.set_num_threads(threads)


def _killed(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-3000:])


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stderr[-3000:]


def _fell_back(res: subprocess.CompletedProcess, damaged: str, used: str) -> None:
    lines = [ln for ln in res.stderr.splitlines() if "falling back" in ln]
    assert len(lines) == 1 and f"{damaged} is damaged" in lines[0] and used in lines[0], res.stderr[-3000:]


def _weights(folder: Path) -> dict[str, str]:
    """SHA-256 of every weight file of a model folder (from its checksums.sha256)."""
    sums = read_checksums(folder)
    assert sums is not None
    return {rel: h for rel, h in sums.items() if rel.endswith(".safetensors")}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def pretrain_ref(tmp_path_factory) -> tuple[Path, Path]:
    """(config file, the uninterrupted run's teacher folder)."""
    root = tmp_path_factory.mktemp("faults")
    yaml = root / "tiny.yaml"
    yaml.write_text(PRETRAIN_YAML)
    out = root / "ref-teacher"
    _in_process(["pretrain", "--config", str(yaml), "--out", str(out)], root / "ref-cache")
    return yaml, out


def test_pretrain_survives_kills_and_damaged_checkpoints(pretrain_ref, tmp_path):
    yaml, ref = pretrain_ref
    cache, out = tmp_path / "cache", tmp_path / "teacher"
    run = ["pretrain", "--config", str(yaml), "--out", str(out)]
    _killed(_cli(run, cache, kill="vae:3"))  # VAE stage, between checkpoints
    work = next(cache.glob("teachers/*/work"))
    _killed(_cli(run + ["--resume"], cache, kill="checkpoint:4"))  # while saving the VAE's checkpoint 4
    assert (work / "vae" / "ckpt-00000004.tmp").is_dir() and not (work / "vae" / "ckpt-00000004").exists()
    _killed(_cli(run + ["--resume"], cache, kill="flow:5"))  # mid flow stage
    assert sorted(p.name for p in (work / "flow").glob("ckpt-*")) == ["ckpt-00000002", "ckpt-00000004"]
    _truncate(work / "flow" / "ckpt-00000004" / "model.safetensors")
    res = _cli(run + ["--resume"], cache, kill="save-pipeline")  # while writing the finished teacher
    _killed(res)
    _fell_back(res, "ckpt-00000004", "ckpt-00000002")
    _flip(work / "flow" / "ckpt-00000008" / "optimizer.bin")
    res = _cli(run + ["--resume"], cache)
    _ok(res)
    _fell_back(res, "ckpt-00000008", "ckpt-00000006")
    assert _weights(out) == _weights(ref)  # bit for bit


def test_distill_survives_kills_and_damaged_checkpoints(pretrain_ref, tmp_path):
    _, teacher = pretrain_ref
    _in_process(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "ref"), *DISTILL],
                tmp_path / "ref-cache")
    cache, out = tmp_path / "cache", tmp_path / "student"
    run = ["distill", "--teacher", str(teacher), "--out", str(out), *DISTILL]
    _killed(_cli(run, cache, kill="distill:3"))  # DMD stage; checkpoints 1, 2
    ckpts = next(cache.glob("distill/*/checkpoints"))
    _flip(ckpts / "ckpt-00000002" / "random_states_0.pkl")
    res = _cli(run + ["--resume"], cache, kill="checkpoint:5")  # while saving checkpoint 5 (split stage)
    _killed(res)
    _fell_back(res, "ckpt-00000002", "ckpt-00000001")
    (ckpts / "ckpt-00000004" / "random_states_0.pkl").unlink()
    res = _cli(run + ["--resume"], cache, kill="save-pipeline")  # while writing the student
    _killed(res)
    _fell_back(res, "ckpt-00000004", "ckpt-00000003")
    _ok(_cli(run + ["--resume"], cache))
    ref = _weights(tmp_path / "ref")
    assert "transformer_branch1/diffusion_pytorch_model.safetensors" in ref
    assert _weights(out) == ref  # bit for bit, every branch


def test_diverging_distillation_names_the_last_good_checkpoint(pretrain_ref, tmp_path, monkeypatch):
    from sd35flash.config import merge
    from sd35flash.distill.config import load_distill_config
    from sd35flash.distill.run import distill
    from sd35flash.errors import TrainingAlarm
    from sd35flash.train.checkpoint import CheckpointManager, read_meta

    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path / "cache"))
    # two sane trajectory-guidance steps, then a DMD learning rate that blows the weights up (set on the
    # dataclass directly: a config file or --set refuses a learning rate above 10)
    cfg = merge(load_distill_config("smoke"), {"split": {"steps": 0}, "checkpoint_every": 1, "probe_every": 1,
                                               "student": {"steps": 3, "warmup": 0}})
    cfg.student.lr = 1e8
    with pytest.raises(TrainingAlarm) as e:
        distill(cfg, str(pretrain_ref[1]), tmp_path / "student", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "the last good checkpoint is" in msg and "ckpt-00000002 (step 2)" in msg, msg
    root = next((tmp_path / "cache").glob("distill/*/checkpoints"))
    latest = CheckpointManager(root).latest()
    assert latest.name == "ckpt-00000002" and read_meta(latest)["good"]
    assert read_meta(latest)["weights_max_abs"] < 1e4
    assert not (tmp_path / "student").exists()
