"""Stopping a training run cleanly before something kills it.

Cluster schedulers send ``SIGTERM`` (Slurm: also ``--signal=USR1@SECONDS``) some time before they kill
a job at its time limit, and a working session on a shared machine has an end too. While
:func:`stop_on_signals` is active (``sd35flash pretrain`` and ``distill`` enter it; ``--time-limit``
sets its deadline):

* the first ``SIGTERM`` or ``SIGUSR1``, or the deadline passing, asks the run to stop; a second signal
  kills the process as usual;
* every training loop asks :func:`should_stop` at the end of each step. All processes of a
  multi-process run agree through one all-reduce of a flag, so they stop at the same step, save one
  checkpoint together and raise :class:`~sd35flash.errors.StopTraining`;
* the CLI prints one line and exits with :data:`EXIT_STOPPED` (75, ``EX_TEMPFAIL``: not done, run it
  again). ``--resume`` continues exactly from that checkpoint.

Importing this module does not import torch (the CLI imports it for every command).

Outside the context (tests, library use) nothing is installed and no collective runs.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..errors import StopTraining

if TYPE_CHECKING:
    from .checkpoint import CheckpointManager

__all__ = ["EXIT_STOPPED", "StopRequest", "checkpoint_step", "should_stop", "stop_on_signals"]

#: Exit status of a run that stopped early with a checkpoint (``EX_TEMPFAIL`` of sysexits.h).
EXIT_STOPPED = 75
#: Signals that ask a run to stop (those this platform has).
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n))


def _fmt(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


class StopRequest:
    """Why this process wants to stop, if it does: a signal it received, or a passed deadline
    (``time_limit`` seconds from now on ``clock``)."""

    def __init__(self, time_limit: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.time_limit = time_limit
        self.deadline = None if time_limit is None else clock() + time_limit
        self.signal_name: str | None = None

    def reason(self) -> str | None:
        if self.signal_name is not None:
            return f"{self.signal_name} received"
        if self.deadline is not None and self.clock() >= self.deadline:
            return f"time limit of {_fmt(self.time_limit)} reached"
        return None


_active: StopRequest | None = None


@contextmanager
def stop_on_signals(time_limit: float | None = None) -> Iterator[StopRequest]:
    """Make training loops stop at the next step end on ``SIGTERM``/``SIGUSR1`` or after
    ``time_limit`` seconds (see the module docstring). Handlers are installed only in the main
    thread and restored on exit."""
    global _active
    request = StopRequest(time_limit)
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            request.signal_name = signal.Signals(signum).name
            for s in STOP_SIGNALS:  # a second signal ends the process the usual way
                signal.signal(s, signal.SIG_DFL)

        for s in STOP_SIGNALS:
            previous[s] = signal.signal(s, handler)
    outer, _active = _active, request
    try:
        yield request
    finally:
        _active = outer
        for s, h in previous.items():
            signal.signal(s, h)


def should_stop(acc) -> str | None:
    """The reason to stop after the current step, agreed by every process (an all-reduce when a
    :func:`stop_on_signals` context is active and the run has several processes), or None."""
    if _active is None:
        return None
    reason = _active.reason()
    if acc.num_processes > 1:
        import torch

        flag = torch.tensor([0.0 if reason is None else 1.0], device=acc.device)
        if acc.reduce(flag, reduction="sum").item() > 0 and reason is None:
            reason = "another process was asked to stop"
    return reason


def checkpoint_step(acc, manager: CheckpointManager, done: int, total: int, every_n: int,
                    stop_at: int | None = None, meta: Callable[[], dict] | None = None) -> None:
    """After step ``done`` of ``total``: save a checkpoint every ``every_n`` steps, at the end, at
    the manager's milestones, at ``stop_at`` and when the run must stop (``meta()`` adds to its
    ``meta.json``); after a stop's checkpoint (before the end) raise :class:`StopTraining` with the
    step and the reason."""
    reason = None
    if done < total:
        reason = should_stop(acc)
        if reason is None and done == stop_at:
            reason = "stop_at"
    if (every_n > 0 and done % every_n == 0) or done == total or reason is not None or done in manager.milestones:
        manager.save(acc, done, meta=meta() if meta is not None else None)
    if reason == "stop_at":
        raise StopTraining(f"stopped at step {done} as asked; resume to continue")
    if reason is not None:
        raise StopTraining(f"stopped at step {done} of {total} ({reason}); its checkpoint is saved in "
                           f"{manager.root}: rerun the same command with --resume to continue")
