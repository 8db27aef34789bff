"""A model folder's sampling settings: the schedule, step count and guidance it is run with when the
command line does not override them (``eval``, ``generate``, ``bench``, ``study create``, the
deployment runtime's calibration)."""

from __future__ import annotations

from pathlib import Path

from .. import flow
from ..errors import UserError
from ..sampling import scheduler_schedule
from .registry import settings_for_folder
from .student_info import read_student_info

#: Default guidance for a teacher (no sd35flash.json); students carry their own in sd35flash.json.
TEACHER_DEFAULT_GUIDANCE = 4.0
TEACHER_DEFAULT_STEPS = 28


def resolve_sampling(pipe, model: str, steps: int | None, guidance: float | None) -> tuple[flow.Schedule, int, float]:
    """Schedule, steps and guidance: a student's ``sd35flash.json`` supplies its own schedule (when
    ``steps`` is not overridden) and guidance 1.0; a teacher uses its scheduler's own schedule, as
    the stock pipeline does, and a shipped teacher's registry entry its recommended steps and
    guidance; a student run at another step count uses shifted uniform steps."""
    info = read_student_info(model) if Path(model).is_dir() else None
    shipped = settings_for_folder(model) if info is None and Path(model).is_dir() else None
    shift = float(pipe.scheduler.config.get("shift", 3.0))
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if info is not None and (steps is None or steps == info.steps):
        sched = flow.Schedule.from_step_times(info.timesteps)
        return sched, info.steps, info.guidance if guidance is None else guidance
    steps = steps or (info.steps if info is not None else shipped.steps if shipped else TEACHER_DEFAULT_STEPS)
    g = guidance if guidance is not None else (info.guidance if info is not None else
                                               shipped.guidance if shipped else TEACHER_DEFAULT_GUIDANCE)
    sched = flow.sampling_schedule(steps, shift) if info is not None else scheduler_schedule(pipe, steps)
    return sched, steps, g
