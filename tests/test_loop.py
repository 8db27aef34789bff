"""The generic training loop: accumulation equals the full batch, a non-finite loss stops before the
optimiser steps, stage boundaries and hooks run in order, checkpoints stop and resume exactly."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from sd35flash.errors import StopTraining, TrainingAlarm
from sd35flash.train.checkpoint import CheckpointManager
from sd35flash.train.ema import EMAHook
from sd35flash.train.logger import RunLogger
from sd35flash.train.loop import CheckpointHook, Hook, Stage, TrainLoop, Update


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt


def _run(acc, tmp_path, stages, hooks, start=0):
    log = RunLogger(acc, tmp_path, "t", total=sum(s.steps for s in stages), start=start, progress=False)
    try:
        return TrainLoop(acc, stages, hooks, log_every=1).run(start, log)
    finally:
        log.close(end_training=False)


def test_accumulation_equals_the_full_batch(tmp_path):
    acc = Accelerator(cpu=True)
    x, y = _data()
    results = []
    for n in (1, 2, 4):
        model, opt = _setup()

        def loss(micro, n=n, model=model):
            part = slice(micro * 8 // n, (micro + 1) * 8 // n)
            value = ((model(x[part]) - y[part]) ** 2).mean()
            return value, {"mse": value.detach()}

        upd = Update(loss, opt, model, clip=100.0, grad_norm_key="gn", loss_key="mse", accumulate=n)
        _run(acc, tmp_path / str(n), [Stage("fit", 3, lambda s, upd=upd: [upd])], [])
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-6) and torch.allclose(results[0], results[2], atol=1e-6)
    init = torch.cat([p.detach().flatten() for p in _setup()[0].parameters()])
    assert not torch.allclose(results[0], init, atol=1e-3)  # it did train


def test_non_finite_loss_stops_before_the_step(tmp_path):
    acc = Accelerator(cpu=True)
    model, opt = _setup()
    before = [p.detach().clone() for p in model.parameters()]

    def loss(micro):
        value = model(torch.full((1, 3), float("nan"))).sum()
        return value, {}

    upd = Update(loss, opt, model, clip=1.0, grad_norm_key="fit/grad_norm", loss_key="fit/loss")
    with pytest.raises(TrainingAlarm, match="fit/loss became nan at step 0"):
        _run(acc, tmp_path, [Stage("fit", 2, lambda s: [upd])], [])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class Recorder(Hook):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_start(self, step, log):
        self.events.append(("start", step))

    def after_step(self, step, stage):
        self.events.append(("after", step, stage.name))

    def on_step_end(self, done, total, values, log):
        self.events.append(("end", done, sorted(values)))


def test_stages_hooks_and_checkpoint_resume(tmp_path):
    acc = Accelerator(cpu=True)
    x, y = _data()

    def build():
        model, opt = _setup()
        from diffusers.training_utils import EMAModel

        ema = EMAModel(model.parameters(), decay=0.5)
        began: list[int] = []

        def loss(micro):
            value = ((model(x) - y) ** 2).mean()
            return value, {"mse": value.detach()}

        upd = Update(loss, opt, model, clip=1.0, grad_norm_key="gn", loss_key="mse")
        stages = [Stage("a", 2, lambda s: [upd]), Stage("b", 2, lambda s: [upd], begin=began.append)]
        pmodel, popt = acc.prepare(model, opt)
        upd.module, upd.optimizer = pmodel, popt
        acc.register_for_checkpointing(ema)
        return model, ema, began, stages

    model, ema, began, stages = build()
    rec = Recorder()
    manager = CheckpointManager(tmp_path / "straight")
    _run(acc, tmp_path, stages, [EMAHook(ema, model.parameters, stages={"a"}), rec,
                                 CheckpointHook(acc, manager, every_n=10)])
    assert began == [2]
    assert rec.events[0] == ("start", 0) and ("after", 2, "b") in rec.events
    assert rec.events[2] == ("end", 1, ["gn", "mse"])
    assert ema.optimization_step == 2  # only stage "a" steps the EMA
    assert [p.name for p in manager.all()] == ["ckpt-00000004"]
    straight = [p.detach().clone() for p in model.parameters()]
    acc._custom_objects.clear()
    acc._models.clear()
    acc._optimizers.clear()

    model, ema, began, stages = build()  # stopped at the stage boundary, then resumed
    manager = CheckpointManager(tmp_path / "resumed")
    with pytest.raises(StopTraining):
        _run(acc, tmp_path, stages, [EMAHook(ema, model.parameters, stages={"a"}),
                                     CheckpointHook(acc, manager, every_n=10, stop_at=2)])
    assert began == []
    acc._custom_objects.clear()
    acc._models.clear()
    acc._optimizers.clear()
    model, ema, began, stages = build()
    step = manager.load(acc)
    assert step == 2
    _run(acc, tmp_path, stages, [EMAHook(ema, model.parameters, stages={"a"}),
                                 CheckpointHook(acc, manager, every_n=10)], start=step)
    assert began == [2] and ema.optimization_step == 2
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(straight, model.parameters()))
    acc._custom_objects.clear()
    acc._models.clear()
    acc._optimizers.clear()
