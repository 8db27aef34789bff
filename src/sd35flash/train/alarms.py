"""Alarms: stop training on NaN/inf or collapse instead of silently training on garbage.

The messages say what went wrong and when; the caller adds which checkpoint is the last good one
(:meth:`sd35flash.train.checkpoint.CheckpointManager.alarm`).
"""

from __future__ import annotations

import math

import torch

from ..errors import TrainingAlarm


def check_finite(step: int, **values: float | torch.Tensor) -> None:
    """Raise :class:`TrainingAlarm` naming the first non-finite value (loss, gradient norm, ...)."""
    for name, v in values.items():
        x = float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)
        if not math.isfinite(x):
            raise TrainingAlarm(
                f"{name} became {x} at step {step}; training stopped"
            )


class CollapseDetector:
    """Flags collapse when a probe statistic falls below ``ratio`` x its first (reference) value.

    Used with the per-batch pixel standard deviation of samples, or a judge/alignment score on a
    small probe set: DMD-style training that drifts to flat colours shows up as a std collapse.
    ``patience`` consecutive bad probes are needed before the alarm fires.
    """

    def __init__(self, name: str, ratio: float = 0.35, patience: int = 2, floor: float = 0.0) -> None:
        self.name = name
        self.ratio = ratio
        self.patience = patience
        self.floor = floor
        self.reference: float | None = None
        self.bad = 0

    def update(self, step: int, value: float) -> None:
        if not math.isfinite(value):
            self.bad = self.patience
            raise TrainingAlarm(f"probe {self.name} became {value} at step {step} (NaN/inf samples); training stopped")
        if self.reference is None:
            self.reference = value
            return
        limit = max(self.reference * self.ratio, self.floor)
        self.bad = self.bad + 1 if value < limit else 0
        if self.bad >= self.patience:
            raise TrainingAlarm(
                f"samples collapsed: {self.name} fell to {value:.4g} (reference {self.reference:.4g}) at step "
                f"{step}; training stopped"
            )

    @property
    def healthy(self) -> bool:
        """Whether the latest probe was fine (no bad probe pending)."""
        return self.bad == 0

    def state_dict(self) -> dict:
        return {"reference": self.reference, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.reference, self.bad = state["reference"], int(state["bad"])
