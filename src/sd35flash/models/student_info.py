"""``sd35flash.json``: the one file a student folder adds to a stock SD3 pipeline folder.

It records the student's timestep schedule (the K times it was trained to be evaluated at), the
recommended sampling settings and the provenance. Example::

    {"format": 1, "timesteps": [1.0, 0.75, 0.5, 0.25], "steps": 4, "guidance": 1.0,
     "needs_t5": true, "teacher": "runs/teacher", "recipe": "configs/toy-4step.yaml",
     "commit": "3f2c1ab", "extra": {}}

Timesteps use the rectified-flow convention of this project and of diffusers' sigmas:
``x_t = (1 - t) * x_0 + t * noise``, so ``t = 1`` is pure noise and sampling runs from ``t_1 = 1``
down to 0.

Reproducing the schedule in stock diffusers
-------------------------------------------
``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=s)`` (what ``StableDiffusion3Pipeline``
calls when given ``sigmas=s``) does **not** use ``s`` as-is. With a static shift (SD3/SD3.5:
``use_dynamic_shifting=False``, ``shift=3.0``) it

1. applies the shift again: ``sigma = shift * s / (1 + (shift - 1) * s)``;
2. sets ``timesteps = sigma * num_train_timesteps`` (what the transformer is conditioned on);
3. appends the terminal ``sigma = 0`` itself.

So the values to pass are the *inverse-shifted* student times, without the final 0:
``s_k = t_k / (shift - (shift - 1) * t_k)``. That is :meth:`StudentInfo.sigmas`. After
``pipe(prompt, sigmas=info.sigmas(pipe.scheduler.config.shift), guidance_scale=info.guidance)``
the scheduler visits exactly ``t_1, ..., t_K, 0`` (up to float32 rounding, ~1e-7).

``timesteps=`` alone is *not* equivalent: ``set_timesteps(timesteps=T)`` uses ``T`` for the model
but derives ``sigma = shift(T / 1000)`` for the Euler update, so it is consistent only when
``shift = 1``; and ``StableDiffusion3Pipeline.__call__`` (diffusers 0.42) has no ``timesteps``
argument anyway. Calling ``scheduler.set_timesteps(sigmas=info.sigmas(shift),
timesteps=info.model_timesteps())`` directly is consistent (same result as ``sigmas`` alone).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sd35flash.errors import UserError

__all__ = [
    "FILENAME",
    "FORMAT_VERSION",
    "StudentInfo",
    "info_to_json",
    "read_student_info",
    "write_student_info",
]

FILENAME = "sd35flash.json"
FORMAT_VERSION = 1


@dataclass
class StudentInfo:
    """Schedule, recommended settings and provenance of a distilled student."""

    timesteps: list[float]  # the K student t values in (0, 1], descending, t_1 = 1
    steps: int
    guidance: float = 1.0
    needs_t5: bool = True
    teacher: str = ""
    recipe: str = ""
    commit: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`UserError` unless the schedule and fields are well formed."""
        ts = self.timesteps
        if not isinstance(ts, list) or not ts:
            raise UserError("'timesteps' must be a non-empty list of numbers in (0, 1]")
        for t in ts:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 < t <= 1:
                raise UserError(f"timestep {t!r} is not a number in (0, 1]")
        if not math.isclose(ts[0], 1.0, abs_tol=1e-9):
            raise UserError(f"the first timestep must be 1.0 (pure noise), got {ts[0]!r}")
        if any(b >= a for a, b in zip(ts, ts[1:])):
            raise UserError(f"'timesteps' must be strictly descending, got {ts}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps != len(ts):
            raise UserError(f"'steps' ({self.steps!r}) must equal the number of timesteps ({len(ts)})")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) or self.guidance < 0:
            raise UserError(f"'guidance' must be a number >= 0, got {self.guidance!r}")
        if not isinstance(self.needs_t5, bool):
            raise UserError(f"'needs_t5' must be true or false, got {self.needs_t5!r}")
        for key in ("teacher", "recipe", "commit"):
            if not isinstance(getattr(self, key), str):
                raise UserError(f"'{key}' must be a string")
        if not isinstance(self.extra, dict):
            raise UserError("'extra' must be an object")

    def sigmas(self, shift: float = 3.0) -> list[float]:
        """Values for diffusers' ``sigmas=`` so a scheduler with static ``shift`` visits ``timesteps``.

        ``s_k = t_k / (shift - (shift - 1) * t_k)``, the inverse of the scheduler's
        ``sigma = shift * s / (1 + (shift - 1) * s)``; K values, no trailing 0 (the scheduler appends
        it). ``shift`` is the scheduler's (``pipe.scheduler.config.shift``; 3.0 for SD3.5).
        """
        if not shift > 0:
            raise UserError(f"scheduler shift must be > 0, got {shift!r}")
        return [float(t / (shift - (shift - 1.0) * t)) for t in self.timesteps]

    def sigmas_for(self, scheduler: Any) -> list[float]:
        """:meth:`sigmas` for a given ``FlowMatchEulerDiscreteScheduler`` (reads its shift).

        Raises :class:`UserError` for scheduler settings that transform sigmas in ways this
        inversion does not cover (dynamic shifting, terminal stretching, Karras/exponential/beta).
        """
        config = scheduler.config
        for flag in ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                     "use_beta_sigmas", "invert_sigmas"):
            if config.get(flag):
                raise UserError(
                    f"the scheduler sets {flag}, which re-maps sigmas; use a FlowMatchEulerDiscreteScheduler "
                    "with a static shift (as SD3.5 ships) to sample a student"
                )
        shift = getattr(scheduler, "shift", None) or config.get("shift", 1.0)
        return self.sigmas(float(shift))

    def model_timesteps(self, num_train_timesteps: int = 1000) -> list[float]:
        """The timesteps the transformer is conditioned on: ``t_k * num_train_timesteps``."""
        return [float(t * num_train_timesteps) for t in self.timesteps]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["timesteps"] = [float(t) for t in self.timesteps]
        return {"format": FORMAT_VERSION, **data}

    @classmethod
    def from_dict(cls, data: Any) -> StudentInfo:
        """Build and validate; raises :class:`UserError` on anything malformed."""
        if not isinstance(data, dict):
            raise UserError(f"it must hold a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("format", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise UserError(f"it has format {version!r}; this sd35flash reads format {FORMAT_VERSION}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown key(s) {unknown}; valid keys are {sorted(known)}")
        missing = [k for k in ("timesteps", "steps") if k not in data]
        if missing:
            raise UserError(f"missing key(s) {missing}")
        info = cls(**data)
        info.validate()
        return info


def write_student_info(folder: str | os.PathLike[str], info: StudentInfo) -> Path:
    """Validate ``info`` and write ``folder/sd35flash.json`` atomically (temp file + rename)."""
    try:
        info.validate()
    except UserError as exc:
        raise UserError(f"cannot write {FILENAME}: {exc}") from exc
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"cannot write {FILENAME}: folder {folder} does not exist")
    path = folder / FILENAME
    tmp = folder / f".{FILENAME}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(info_to_json(info), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def info_to_json(info: StudentInfo) -> str:
    """The file's text (stable key order), e.g. for ``save_pipeline(..., extra_files=...)``."""
    return json.dumps(info.to_dict(), indent=2, sort_keys=True) + "\n"


def read_student_info(folder: str | os.PathLike[str]) -> StudentInfo | None:
    """Read ``folder/sd35flash.json``; ``None`` when absent (e.g. a teacher); UserError if malformed."""
    path = Path(folder) / FILENAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-create it with `sd35flash distill`") from exc
    try:
        return StudentInfo.from_dict(data)
    except UserError as exc:
        raise UserError(f"{path} is malformed: {exc}; fix it or re-create it with `sd35flash distill`") from exc
