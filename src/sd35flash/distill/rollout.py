"""Student trajectories: from fresh noise, Euler steps on the student's own schedule.

The schedule is the K student times followed by the final 0: ``t_1 = 1 > t_2 > ... > t_K > 0``.
Step ``i`` (0-based here) goes from ``t_i`` to ``t_{i+1}`` with ``x_{i+1} = x_i + (t_{i+1} - t_i) v``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import flow
from ..sampling import PromptEmbeds, predict_velocity


def bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) for broadcasting against ``like``."""
    return t.view(-1, *([1] * (like.ndim - 1)))


def times_at(schedule: Sequence[float], idx: torch.Tensor) -> torch.Tensor:
    """Per-sample times ``t_{idx}`` from the (K + 1)-point schedule."""
    return torch.tensor(list(schedule), dtype=torch.float32, device=idx.device)[idx]


@torch.no_grad()
def rollout_to_step(student: torch.nn.Module, noise: torch.Tensor, schedule: Sequence[float], cond: PromptEmbeds,
                    idx: torch.Tensor) -> torch.Tensor:
    """The student's state ``x_{t_i}`` for each sample's step index ``i = idx``, without gradients.

    Runs steps ``0 .. max(idx) - 1`` from ``noise`` (``x_{t_0} = noise`` at ``t = 1``) and keeps, per
    sample, the state reached after ``idx`` steps.
    """
    x = noise
    out = noise.clone()
    for j in range(int(idx.max().item()) if idx.numel() else 0):
        t, s = float(schedule[j]), float(schedule[j + 1])
        v = predict_velocity(student, x, t, cond).to(x.dtype)
        x = flow.euler_step(x, v, t, s)
        out = torch.where(bcast(idx == j + 1, x), x, out)
    return out


@torch.no_grad()
def student_sample(student: torch.nn.Module, noise: torch.Tensor, schedule: Sequence[float],
                   cond: PromptEmbeds, idx: torch.Tensor) -> torch.Tensor:
    """A detached student sample: ``x0_hat = x_{t_i} - t_i v(x_{t_i}, t_i)`` at step ``i = idx``."""
    x_i = rollout_to_step(student, noise, schedule, cond, idx)
    t_i = times_at(schedule, idx)
    v = predict_velocity(student, x_i, t_i, cond).to(x_i.dtype)
    return flow.x0_from_v(x_i, v, t_i)
