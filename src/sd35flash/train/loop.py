"""One training loop for pretraining and distillation.

A *method* (the teacher's rectified flow, the distillation recipe) says what to compute: a run is a
list of :class:`Stage` objects on one global step counter, and each step of a stage is a sequence of
:class:`Update` objects, each a loss closure with the optimiser that minimises it. The method never
calls ``backward`` or ``step``. :class:`TrainLoop` does the rest, the same way for every method:

* per update: backward (``accumulate`` micro-batches, each loss divided by ``accumulate``, the
  gradient all-reduce of a DDP module deferred to the last one), the total gradient norm before
  clipping, a finiteness check of the loss and that norm *before* the optimiser steps, the optimiser
  and LR-schedule step, ``zero_grad``, then the update's ``after`` action (head re-initialisation,
  a branch EMA);
* per step: the metrics averaged over processes in one all-reduce, checked for NaN/inf, logged every
  ``log_every`` steps (and at the end);
* everything else is a :class:`Hook`: the EMA (:mod:`.ema`), probes with the collapse alarm, sample
  grids and checkpoints (:class:`CheckpointHook`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from .alarms import check_finite
from .checkpoint import CheckpointManager
from .logger import RunLogger
from .sharding import clip_grad_norm
from .stopping import checkpoint_step

Metrics = dict[str, torch.Tensor]
LossFn = Callable[[int], tuple[torch.Tensor, Metrics]]


@dataclass
class Update:
    """One optimiser update: ``loss(micro)`` returns ``(loss, metrics)`` for micro-batch ``micro``
    (``0 .. accumulate - 1``) without calling backward; ``module`` is the (prepared) module whose
    parameters are clipped to ``clip``; the norm before clipping is logged as ``grad_norm_key`` and,
    with ``lr_key``, the learning rate after the schedule's step. ``loss_key`` names the loss in a
    non-finite alarm. ``after`` runs after the optimiser step; the metrics it returns (if any) join
    the update's. ``leads``: this update's metrics
    come first in the step's metrics (the progress bar shows the first four)."""

    loss: LossFn
    optimizer: torch.optim.Optimizer
    module: torch.nn.Module
    clip: float
    grad_norm_key: str
    loss_key: str
    scheduler: Any = None
    lr_key: str | None = None
    after: Callable[[], Metrics | None] | None = None
    accumulate: int = 1
    leads: bool = False


@dataclass
class Stage:
    """``steps`` global steps; ``updates(step)`` lists the updates of one step, in order (their loss
    closures draw data only when the loop calls them). ``begin(step)`` runs before the stage's first
    step (also when a resume lands exactly there)."""

    name: str
    steps: int
    updates: Callable[[int], Iterable[Update]]
    begin: Callable[[int], None] | None = None


class Hook:
    """Called by :class:`TrainLoop`: ``on_start`` once before the first step it runs;
    ``after_step(step, stage)`` right after the updates of global step ``step`` (EMA);
    ``on_step_end(done, values, log)`` after the step counter advanced to ``done`` and the metrics
    were logged (probes, grids, checkpoints)."""

    def on_start(self, step: int, log: RunLogger) -> None:
        pass

    def after_step(self, step: int, stage: Stage) -> None:
        pass

    def on_step_end(self, done: int, total: int, values: dict[str, float], log: RunLogger) -> None:
        pass


def every(n: int, done: int, total: int) -> bool:
    """True every ``n`` steps (``n > 0``) and at the last step."""
    return n > 0 and (done % n == 0 or done == total)


class PeriodicHook(Hook):
    """``fn(done, log)`` every ``every_n`` steps and at the last step (never when ``every_n <= 0``)."""

    def __init__(self, every_n: int, fn: Callable[[int, RunLogger], None]) -> None:
        self.every_n, self.fn = every_n, fn

    def on_step_end(self, done: int, total: int, values: dict[str, float], log: RunLogger) -> None:
        if every(self.every_n, done, total):
            self.fn(done, log)


class CheckpointHook(Hook):
    """An atomic checkpoint every ``every_n`` steps, at the end, at ``stop_at`` and when the run is
    asked to stop (:mod:`.stopping`); after the one at ``stop_at`` or a stop (before the end)
    :class:`~sd35flash.errors.StopTraining` is raised. ``meta()`` adds to ``meta.json``."""

    def __init__(self, acc: Accelerator, manager: CheckpointManager, every_n: int, stop_at: int | None = None,
                 meta: Callable[[], dict] | None = None) -> None:
        self.acc, self.manager, self.every_n, self.stop_at = acc, manager, every_n, stop_at
        self.meta = meta

    def on_step_end(self, done: int, total: int, values: dict[str, float], log: RunLogger) -> None:
        checkpoint_step(self.acc, self.manager, done, total, self.every_n, self.stop_at, self.meta)


class TrainLoop:
    """Runs ``stages`` from a global step; see the module docstring."""

    def __init__(self, acc: Accelerator, stages: list[Stage], hooks: list[Hook], log_every: int = 10) -> None:
        self.acc, self.stages, self.hooks, self.log_every = acc, stages, hooks, log_every
        self.total = sum(s.steps for s in stages)

    def stage_at(self, step: int) -> tuple[Stage, int]:
        """The stage global step ``step`` belongs to, and that stage's first step."""
        start = 0
        for s in self.stages:
            if step < start + s.steps:
                return s, start
            start += s.steps
        return self.stages[-1], start - self.stages[-1].steps

    def run(self, step: int, log: RunLogger) -> int:
        """Train from ``step`` to the end; returns the final step."""
        for h in self.hooks:
            h.on_start(step, log)
        while step < self.total:
            stage, start = self.stage_at(step)
            if step == start and stage.begin is not None:
                stage.begin(step)
            lead: Metrics = {}
            rest: Metrics = {}
            for upd in stage.updates(step):
                (lead if upd.leads else rest).update(self.apply(upd, step))
            values = self.reduce({**lead, **rest})
            check_finite(step, **values)
            for h in self.hooks:
                h.after_step(step, stage)
            step += 1
            log.advance()
            if every(self.log_every, step, self.total):
                log.scalars(step, values)
            for h in self.hooks:
                h.on_step_end(step, self.total, values, log)
        return step

    def apply(self, upd: Update, step: int) -> Metrics:
        """Backward over the micro-batches, clip, check, step; returns the update's metrics
        (averaged over micro-batches) with its gradient norm (and learning rate)."""
        n = max(1, upd.accumulate)
        sums: Metrics = {}
        total_loss = torch.zeros(())
        for micro in range(n):
            sync = micro == n - 1 or not hasattr(upd.module, "no_sync")
            ctx = nullcontext() if sync else self.acc.no_sync(upd.module)
            with ctx:
                loss, metrics = upd.loss(micro)
                self.acc.backward(loss / n if n > 1 else loss)
            total_loss = total_loss + loss.detach().float().cpu() / n
            for k, v in metrics.items():
                v = v.detach().float()
                sums[k] = sums[k] + v / n if k in sums else v / n
        gn = clip_grad_norm(self.acc, upd.module.parameters(), upd.clip)
        check_finite(step, **{upd.loss_key: total_loss, upd.grad_norm_key: gn})
        upd.optimizer.step()
        if upd.scheduler is not None:
            upd.scheduler.step()
        upd.optimizer.zero_grad(set_to_none=True)
        late = upd.after() if upd.after is not None else None
        out = {**sums, **(late or {}), upd.grad_norm_key: gn}
        if upd.lr_key is not None:
            out[upd.lr_key] = torch.tensor(upd.scheduler.get_last_lr()[0])
        return out

    def reduce(self, metrics: Metrics) -> dict[str, float]:
        """Mean of each metric over processes (one all-reduce), as floats: every process then sees
        the same numbers, so a NaN alarm stops all of them together."""
        if not metrics:
            return {}
        names = list(metrics)
        dev = self.acc.device
        vec = torch.stack([metrics[k].detach().float().reshape(()).to(dev) for k in names])
        if self.acc.num_processes > 1:
            vec = self.acc.reduce(vec, reduction="mean")
        return dict(zip(names, vec.tolist()))
