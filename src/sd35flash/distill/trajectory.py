"""Stage 0, trajectory guidance (TG): regress each student step onto the teacher's ODE (METHOD.md).

Teacher trajectories run from noise with CFG at N steps on the shifted-uniform schedule
``flow.sampling_schedule(N, shift)``, which passes exactly through every student time when K
divides N. The states at ``t_1 .. t_K`` and the end point (``t = 0``) are recorded and cached on
disk, keyed by the teacher, the prompts and the settings, so later runs reuse them.

Loss: each student step maps the teacher state at ``t_i`` to the teacher state at ``t_{i+1}`` in one
Euler step, ``L_TG = || x_{t_i} + (t_{i+1} - t_i) v_theta(x_{t_i}, t_i) - x_{t_{i+1}} ||^2``; in
velocity space, ``|| v_theta(x_{t_i}, t_i) - (x_{t_{i+1}} - x_{t_i}) / (t_{i+1} - t_i) ||^2``, the same
per step divided by ``dt^2``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import flow
from ..io import atomic_torch_save
from ..sampling import PromptEmbeds, guided_velocity, make_noise, predict_velocity
from .rollout import bcast, times_at

TRAJECTORY_FORMAT = 1


@dataclass
class TrajectoryBank:
    """``states[m, k]``: the teacher state of trajectory ``m`` at student time ``schedule[k]``
    (K + 1 entries, the last at ``t = 0``: the teacher's sample), with ``prompts[m]``."""

    prompts: list[str]
    states: torch.Tensor
    schedule: flow.Schedule

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def samples(self) -> torch.Tensor:
        """The teacher's end points (its many-step CFG samples): the GAN's default real side."""
        return self.states[:, -1]


def teacher_schedule(student: flow.Schedule, teacher_steps: int, shift: float) -> tuple[flow.Schedule, list[int]]:
    """The N-step teacher schedule and the positions in it of the K + 1 student times.

    ``flow.sampling_schedule(N, shift)`` holds ``shift(1 - j / N)``; student time ``k`` of a
    shifted-uniform K-step schedule sits at ``j = k N / K``. Custom student schedules are matched to
    the nearest teacher time, which must agree within 1e-6.
    """
    sched = flow.sampling_schedule(teacher_steps, shift)
    where = []
    for t in student.times:
        j = min(range(len(sched.times)), key=lambda n: abs(sched.times[n] - t))
        if abs(sched.times[j] - t) > 1e-6:
            raise ValueError(f"student time {t} is not on the teacher's {teacher_steps}-step schedule; "
                             "use the default schedule or a multiple of its step count")
        where.append(j)
    return sched, where


@torch.no_grad()
def teacher_trajectories(teacher: torch.nn.Module, noise: torch.Tensor, schedule: flow.Schedule,
                         record: Sequence[int], cond: PromptEmbeds, uncond: PromptEmbeds | None,
                         guidance: float) -> torch.Tensor:
    """Euler with CFG from ``noise`` along ``schedule``; returns the states at positions ``record``
    stacked as (B, len(record), C, H, W)."""
    out = {0: noise} if 0 in record else {}

    def keep(j: int, x: torch.Tensor, v: torch.Tensor, x_next: torch.Tensor) -> None:
        if j + 1 in record:
            out[j + 1] = x_next

    flow.euler_sample(lambda j, t, x: guided_velocity(teacher, x, t, cond, uncond, guidance), noise, schedule,
                      after_step=keep)
    return torch.stack([out[r] for r in record], dim=1)


def cache_key(teacher_id: str, prompts: Sequence[str], settings: dict) -> str:
    """A short hash of the teacher's identity, the prompt list and every setting that changes states."""
    h = hashlib.sha256()
    h.update(json.dumps({"teacher": teacher_id, "settings": settings, "format": TRAJECTORY_FORMAT},
                        sort_keys=True).encode())
    for p in prompts:
        h.update(p.encode() + b"\0")
    return h.hexdigest()[:16]


def teacher_identity(teacher: str, revision: str | None) -> str:
    """A local folder is identified by its path and its weight files' sizes and mtimes; a hub id by
    id and revision."""
    p = Path(teacher).expanduser()
    if not p.is_dir():
        return f"{teacher}@{revision or 'main'}"
    parts = [str(p.resolve())]
    for f in sorted(p.rglob("*.safetensors")):
        st = f.stat()
        parts.append(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def load_or_build(path: Path, build: Callable[[], TrajectoryBank]) -> tuple[TrajectoryBank, bool]:
    """Reuse the bank at ``path`` or build it and write it atomically (temp file + rename).
    Returns ``(bank, reused)``."""
    if path.is_file():
        blob = torch.load(path, weights_only=True)
        return TrajectoryBank(list(blob["prompts"]), blob["states"].float(), flow.Schedule.of(blob["schedule"])), True
    bank = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path, {"prompts": bank.prompts, "states": bank.states, "schedule": bank.schedule.to_list()},
                      "teacher trajectories")
    return bank, False


def build_bank(teacher: torch.nn.Module, encode: Callable[[list[str]], PromptEmbeds],
               uncond: Callable[[int], PromptEmbeds], prompts: Sequence[str], step_times: Sequence[float],
               teacher_steps: int, shift: float, guidance: float, latent_shape: tuple[int, int, int],
               seed: int, batch_size: int, device: torch.device | str,
               progress: Callable[[int], None] | None = None) -> TrajectoryBank:
    """Teacher CFG trajectories for ``prompts`` from per-trajectory noise seeds ``seed + m``, at the
    student's K ``step_times`` (as a recipe stores them) and its end point."""
    student = flow.Schedule.from_step_times(step_times)
    sched, record = teacher_schedule(student, teacher_steps, shift)
    states = []
    for start in range(0, len(prompts), batch_size):
        ps = list(prompts[start : start + batch_size])
        noise = make_noise(latent_shape, [seed + start + m for m in range(len(ps))], device=device)
        states.append(teacher_trajectories(teacher, noise, sched, record, encode(ps), uncond(len(ps)), guidance).cpu())
        if progress is not None:
            progress(len(ps))
    return TrajectoryBank(list(prompts), torch.cat(states), student)


def tg_loss(student: torch.nn.Module, states: torch.Tensor, idx: torch.Tensor, schedule: flow.Schedule,
            cond: PromptEmbeds, space: str = "x") -> torch.Tensor:
    """For step ``i = idx``, ``space="x"``: ``|| x_{t_i} + dt v_theta(x_{t_i}, t_i) - x_{t_{i+1}} ||^2``;
    ``space="velocity"``: ``|| v_theta(x_{t_i}, t_i) - (x_{t_{i+1}} - x_{t_i}) / dt ||^2`` with
    ``dt = t_{i+1} - t_i`` (mean over elements); ``states`` is (B, K + 1, C, H, W)."""
    rows = torch.arange(states.shape[0], device=states.device)
    x_i, x_next = states[rows, idx], states[rows, idx + 1]
    t_i, t_next = times_at(schedule, idx), times_at(schedule, idx + 1)
    v = predict_velocity(student, x_i, t_i, cond)
    if space == "velocity":
        dt = bcast(t_next - t_i, x_i).float()
        return F.mse_loss(v.float(), (x_next.float() - x_i.float()) / dt)
    pred = flow.euler_step(x_i, v.to(x_i.dtype), t_i, t_next)
    return F.mse_loss(pred.float(), x_next.float())
