"""Student trajectories: from fresh noise, Euler steps on the student's own schedule.

The :class:`flow.Schedule` holds the K student times and the final 0: ``t_0 = 1 > t_1 > ... > t_K = 0``.
Step ``i`` goes from ``t_i`` to ``t_{i+1}`` with ``x_{i+1} = x_i + (t_{i+1} - t_i) v``.

``student`` is a module, or (split-timestep stage) a router ``(step_index, t) -> module`` that sends
each step to the branch of its time (``models.branches.BranchRouter``).

``steps`` / ``present`` (what the whole global batch needs: its largest step index, the step indices
it holds) make every process run the same modules the same number of times whatever its own
samples need: sharded modules (FSDP2) all-gather their weights in every call, so the processes must
call them in lockstep. The extra calls do not change any sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import flow
from ..sampling import PromptEmbeds, predict_velocity

Student = torch.nn.Module | Callable[[int, float], torch.nn.Module]


def model_at(student: Student, j: int, t: float) -> torch.nn.Module:
    """The module that runs step ``j`` (at time ``t``): ``student`` itself, or what the router picks."""
    return student if isinstance(student, torch.nn.Module) else student(j, t)


def step_velocity(student: Student, x: torch.Tensor, schedule: flow.Schedule, cond: PromptEmbeds,
                  idx: torch.Tensor, present: Sequence[int] = ()) -> torch.Tensor:
    """``v(x, t_idx)`` with each sample at its own step ``idx``; a router runs each distinct step's
    samples through that step's module, and the module of each step in ``present`` that no sample
    here is at on the first sample (result unused; see the module docstring)."""
    t = times_at(schedule, idx)
    if isinstance(student, torch.nn.Module):
        return predict_velocity(student, x, t, cond)
    v = None
    for j in sorted(set(idx.tolist()) | set(present)):
        m = idx == j
        if not bool(m.any()):
            first = torch.zeros_like(m)
            first[0] = True
            predict_velocity(student(j, schedule.times[j]), x[first], t[first], cond.index(first))
            continue
        vj = predict_velocity(student(j, schedule.times[j]), x[m], t[m], cond.index(m))
        if v is None:
            v = torch.empty((x.shape[0], *vj.shape[1:]), dtype=vj.dtype, device=vj.device)
        v[m] = vj
    return v


def bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) for broadcasting against ``like``."""
    return t.view(-1, *([1] * (like.ndim - 1)))


def times_at(schedule: flow.Schedule, idx: torch.Tensor) -> torch.Tensor:
    """Per-sample times ``t_{idx}`` from the (K + 1)-point schedule."""
    return torch.tensor(schedule.times, dtype=torch.float32, device=idx.device)[idx]


@torch.no_grad()
def rollout_to_step(student: Student, noise: torch.Tensor, schedule: flow.Schedule, cond: PromptEmbeds,
                    idx: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """The student's state ``x_{t_i}`` for each sample's step index ``i = idx``, without gradients.

    Runs steps ``0 .. max(idx) - 1`` (``0 .. steps - 1`` when given) from ``noise``
    (``x_{t_0} = noise`` at ``t = 1``) and keeps, per sample, the state reached after ``idx`` steps.
    """
    out = noise.clone()
    if steps is None:
        steps = int(idx.max().item()) if idx.numel() else 0

    def keep(j: int, x: torch.Tensor, v: torch.Tensor, x_next: torch.Tensor) -> None:
        nonlocal out
        out = torch.where(bcast(idx == j + 1, x_next), x_next, out)

    def velocity(j: int, t: float, x: torch.Tensor) -> torch.Tensor:
        return predict_velocity(model_at(student, j, t), x, t, cond)

    flow.euler_sample(velocity, noise, schedule, steps, keep)
    return out


@torch.no_grad()
def student_sample(student: Student, noise: torch.Tensor, schedule: flow.Schedule,
                   cond: PromptEmbeds, idx: torch.Tensor, global_idx: torch.Tensor | None = None) -> torch.Tensor:
    """A detached student sample: ``x0_hat = x_{t_i} - t_i v(x_{t_i}, t_i)`` at step ``i = idx``;
    ``global_idx``: the step indices of the whole global batch (see the module docstring)."""
    steps = int(global_idx.max()) if global_idx is not None else None
    present = sorted(set(global_idx.tolist())) if global_idx is not None else ()
    x_i = rollout_to_step(student, noise, schedule, cond, idx, steps)
    t_i = times_at(schedule, idx)
    v = step_velocity(student, x_i, schedule, cond, idx, present).to(x_i.dtype)
    return flow.x0_from_v(x_i, v, t_i)
