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
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sd35flash.checksums import update_checksum
from sd35flash.config import from_dict
from sd35flash.errors import UserError
from sd35flash.io import atomic_write_text

__all__ = [
    "FILENAME",
    "FORMAT_VERSION",
    "BranchInfo",
    "SplitInfo",
    "StudentInfo",
    "info_to_json",
    "read_student_info",
    "write_student_info",
]

FILENAME = "sd35flash.json"
FORMAT_VERSION = 1
_SUBFOLDER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


@dataclass
class BranchInfo:
    """One split-timestep branch: a transformer subfolder that serves the steps with ``t_min < t <= t_max``."""

    subfolder: str
    t_min: float
    t_max: float

    def contains(self, t: float) -> bool:
        return self.t_min < t <= self.t_max


@dataclass
class SplitInfo:
    """The split-timestep branches a student folder keeps beside its merged ``transformer/``.

    ``branches`` cover (0, 1] from the noisiest down (contiguous ranges); ``merge_weights`` are the
    ``w_b`` of the merged ``transformer/`` (``W = sum_b w_b W_b``); ``unmerged`` makes routing each
    step to its branch the folder's default sampling mode; ``presplit`` names the subfolder holding
    the student before stage 2 ("" when it was not kept). Stock diffusers ignores all of this and
    loads the merged ``transformer/``.
    """

    branches: list[BranchInfo]
    merge_weights: list[float]
    unmerged: bool = False
    presplit: str = ""

    def validate(self) -> None:
        if not isinstance(self.branches, list) or len(self.branches) < 2:
            raise UserError("'split.branches' must list at least two branches")
        top = 1.0
        for b in self.branches:
            if not _SUBFOLDER.match(str(b.subfolder)) or not _number(b.t_min) or not _number(b.t_max):
                raise UserError(f"malformed split branch {b}")
            if not math.isclose(b.t_max, top, abs_tol=1e-9) or not 0.0 <= b.t_min < b.t_max:
                raise UserError("'split.branches' must be contiguous ranges (t_min, t_max] from 1 down to 0, "
                                f"got {[(x.t_min, x.t_max) for x in self.branches]}")
            top = b.t_min
        if not math.isclose(top, 0.0, abs_tol=1e-9):
            raise UserError(f"the last split branch must reach t = 0, it stops at {top}")
        w = self.merge_weights
        if not isinstance(w, list) or len(w) != len(self.branches) or not all(_number(x) and x >= 0 for x in w) \
                or not math.isclose(sum(w), 1.0, abs_tol=1e-6):
            raise UserError(f"'split.merge_weights' must hold {len(self.branches)} numbers >= 0 summing to 1, got {w}")
        if not isinstance(self.unmerged, bool):
            raise UserError(f"'split.unmerged' must be true or false, got {self.unmerged!r}")
        if self.presplit and not _SUBFOLDER.match(str(self.presplit)):
            raise UserError(f"'split.presplit' must be a subfolder name, got {self.presplit!r}")



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
    split: SplitInfo | None = None  # split-timestep branches kept in the folder (None: a single transformer)

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
        if self.split is not None:
            if not isinstance(self.split, SplitInfo):
                raise UserError("'split' must describe the branches")
            self.split.validate()

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
        if data["split"] is None:
            del data["split"]  # folders without branches keep the original layout
        return {"format": FORMAT_VERSION, **data}

    @classmethod
    def from_dict(cls, data: Any) -> StudentInfo:
        """Build and validate through :func:`sd35flash.config.from_dict` (unknown keys, types and
        ranges, nested ``split`` included), then :meth:`validate`; raises
        :class:`~sd35flash.errors.ConfigError` (a UserError) naming the key."""
        if not isinstance(data, dict):
            raise UserError(f"it must hold a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("format", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise UserError(f"it has format {version!r}; this sd35flash reads format {FORMAT_VERSION}")
        missing = [k for k in ("timesteps", "steps") if k not in data]
        if missing:
            raise UserError(f"missing key(s) {missing}")
        return from_dict(cls, data, where="sd35flash")


def write_student_info(folder: str | os.PathLike[str], info: StudentInfo) -> Path:
    """Validate ``info`` and write ``folder/sd35flash.json`` atomically (temp file + rename), updating
    the folder's ``checksums.sha256`` when it has one."""
    try:
        info.validate()
    except UserError as exc:
        raise UserError(f"cannot write {FILENAME}: {exc}") from exc
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"cannot write {FILENAME}: folder {folder} does not exist")
    path = atomic_write_text(folder / FILENAME, info_to_json(info), FILENAME)
    update_checksum(folder, FILENAME)
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
