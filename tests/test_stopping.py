"""Stopping a run cleanly: SIGTERM/SIGUSR1 or ``--time-limit`` -> a checkpoint at the end of the
current step, StopTraining, exit 75; ``--resume`` then finishes the run as if it had never stopped."""

from __future__ import annotations

import argparse
import os
import signal

import pytest
import torch
from accelerate import Accelerator

from sd35flash.args import time_limit
from sd35flash.cli import main
from sd35flash.errors import StopTraining
from sd35flash.train.checkpoint import CheckpointManager
from sd35flash.train.logger import RunLogger
from sd35flash.train.loop import CheckpointHook, Hook, Stage, TrainLoop, Update
from sd35flash.train.stopping import EXIT_STOPPED, StopRequest, should_stop, stop_on_signals


def test_durations_parse_and_bad_ones_are_usage_errors():
    assert [time_limit(t) for t in ("90m", "1.5h", "5400", "2h30m", "45 min", "10s")] == \
        [5400.0, 5400.0, 5400.0, 9000.0, 2700.0, 10.0]
    for bad in ("", "soon", "0", "-5", "5x", "h", "1.2.3"):
        with pytest.raises(argparse.ArgumentTypeError, match="--time-limit"):
            time_limit(bad)


def test_a_signal_or_a_passed_deadline_is_a_reason_to_stop():
    now = [100.0]
    req = StopRequest(time_limit=60, clock=lambda: now[0])
    assert req.reason() is None
    now[0] = 160.0
    assert req.reason() == "time limit of 1 min reached"
    acc = Accelerator(cpu=True)
    assert should_stop(acc) is None  # outside the context nothing ever stops
    previous = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as active:
        assert should_stop(acc) is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert active.signal_name == "SIGTERM" and should_stop(acc) == "SIGTERM received"
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second one kills as usual
    assert signal.getsignal(signal.SIGTERM) == previous and should_stop(acc) is None


class _SignalAt(Hook):
    """Sends ``signum`` to this process when step ``at`` ends (before the checkpoint hook runs)."""

    def __init__(self, at: int, signum: int) -> None:
        self.at, self.signum = at, signum

    def on_step_end(self, done, total, values, log):
        if done == self.at:
            os.kill(os.getpid(), self.signum)


def _fit(acc, tmp_path, manager, hooks, start=0):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    pmodel, popt = acc.prepare(model, opt)
    if start:
        assert manager.load(acc) == start
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)

    def loss(micro):
        value = ((pmodel(x) - y) ** 2).mean()
        return value, {"mse": value.detach()}

    upd = Update(loss, popt, pmodel, clip=10.0, grad_norm_key="gn", loss_key="mse")
    log = RunLogger(acc, tmp_path, "t", total=6, start=start, progress=False)
    try:
        TrainLoop(acc, [Stage("fit", 6, lambda s: [upd])], [*hooks, CheckpointHook(acc, manager, every_n=100)],
                  log_every=1).run(start, log)
    finally:
        log.close(end_training=False)
        acc._models.clear()
        acc._optimizers.clear()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_sigusr1_checkpoints_the_step_and_resume_finishes_exactly(tmp_path):
    acc = Accelerator(cpu=True)
    straight = _fit(acc, tmp_path / "a", CheckpointManager(tmp_path / "a"), [])
    manager = CheckpointManager(tmp_path / "b")
    with stop_on_signals(), pytest.raises(StopTraining, match=r"step 3 of 6 \(SIGUSR1 received\).*--resume"):
        _fit(acc, tmp_path / "b", manager, [_SignalAt(3, signal.SIGUSR1)])
    assert [p.name for p in manager.all()] == ["ckpt-00000003"]  # every_n=100: only the stop saved
    resumed = _fit(acc, tmp_path / "b", manager, [], start=3)
    assert torch.allclose(straight, resumed, atol=1e-7)


def test_cli_time_limit_stops_pretraining_with_status_75_and_resume_finishes(cache_dir, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model: {vae_block_out_channels: [8, 16, 16], latent_channels: 4, num_layers: 1,\n"
                   "        num_attention_heads: 2, attention_head_dim: 16, clip_hidden: 16, clip_layers: 2,\n"
                   "        clip_heads: 2, t5_d_model: 32, t5_layers: 1, t5_heads: 2}\n"
                   "vae: {steps: 3, batch_size: 4, num_images: 16, eval_images: 4}\n"
                   "flow: {steps: 3, batch_size: 4, num_images: 16, probe_every: 0, sample_every: 0}\n")
    argv = ["pretrain", "--config", str(cfg), "--out", str(tmp_path / "teacher"), "--no-progress"]
    assert main([*argv, "--time-limit", "0.001s"]) == EXIT_STOPPED
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "stopped at step 1 of 3 (time limit of 0.001 s reached)" in err
    assert "--resume" in err and not (tmp_path / "teacher").exists()
    assert main(argv) == 2  # an unfinished run is never restarted silently
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    assert (tmp_path / "teacher" / "model_index.json").is_file()


TWO_RANKS = r"""
import os, signal, sys
from pathlib import Path
import torch
from accelerate import Accelerator
from sd35flash.errors import StopTraining
from sd35flash.train.checkpoint import CheckpointManager
from sd35flash.train.logger import RunLogger
from sd35flash.train.loop import CheckpointHook, Hook, Stage, TrainLoop, Update
from sd35flash.train.stopping import stop_on_signals

acc = Accelerator(cpu=True)
root = Path(sys.argv[1])
torch.manual_seed(0)
model = torch.nn.Linear(3, 1)
pmodel, popt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
x = torch.randn(4, 3)

def loss(micro):
    value = pmodel(x).pow(2).mean()
    return value, {"mse": value.detach()}

class SignalRankOne(Hook):
    def on_step_end(self, done, total, values, log):
        if done == 2 and acc.process_index == 1:
            os.kill(os.getpid(), signal.SIGUSR1)

upd = Update(loss, popt, pmodel, clip=1.0, grad_norm_key="gn", loss_key="mse")
log = RunLogger(acc, root, "t", total=6, start=0, progress=False)
with stop_on_signals():
    try:
        TrainLoop(acc, [Stage("fit", 6, lambda s: [upd])],
                  [SignalRankOne(), CheckpointHook(acc, CheckpointManager(root), every_n=100)]).run(0, log)
        print(f"rank {acc.process_index}: finished")
    except StopTraining as e:
        print(f"rank {acc.process_index}: {e}")
"""


@pytest.mark.timeout(200)
def test_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "--no-python", sys.executable, "-c", TWO_RANKS, str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode == 0, res.stderr[-4000:]
    # the two ranks share stdout, and their lines may interleave: count each message in the whole output
    out = res.stdout
    assert out.count("rank 0: stopped at step 2 of 6 (another process was asked to stop)") == 1, out
    assert out.count("rank 1: stopped at step 2 of 6 (SIGUSR1 received)") == 1, out
    assert "finished" not in out and out.count("rank ") == 2, out
    assert [p.name for p in CheckpointManager(tmp_path).all()] == ["ckpt-00000002"]
