"""Typed configuration of distillation (``configs/toy-distill-*.yaml``).

One dataclass per concern: the student schedule and teacher guidance at the top, then one nested
dataclass per loss / stage. Every choice METHOD.md marks [ours] is an option here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .. import flow
from ..config import load_config
from ..errors import ConfigError, UserError
from ..train.runtime import RuntimeConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ("smoke", "default")
STUDENT_STEPS = (1, 2, 4)


@dataclass
class TrajectoryConfig:
    """Stage 0, trajectory guidance (TG): regress each student step onto the teacher's ODE.

    ``teacher_steps`` N must be a multiple of the student's K so that the teacher's shifted-uniform
    N-step schedule passes exactly through every student time. ``num_trajectories`` teacher CFG
    trajectories are generated once and cached on disk (keyed by teacher, prompts and settings).
    """

    steps: int = 150
    teacher_steps: int = 32
    num_trajectories: int = 256
    lr: float = 1e-4
    batch_size: int = 16
    cache: bool = True


@dataclass
class DMDConfig:
    """Stage 1 distribution matching. ``timestep_sharing`` picks the evaluation point on the
    student's own line at a shared timestep; ``false`` is vanilla DMD re-noising with a random
    ``tau`` in ``random_tau_range`` and fresh noise. ``last_step``: what the last student step does
    when no shared timestep lies below ``t_K``: ``renoise`` (fresh noise at a shared timestep from
    ``t_2..t_K``; random ``tau`` when K = 1) or ``midpoint`` (stay on the line at ``t_K / 2``)."""

    weight: float = 1.0
    timestep_sharing: bool = True
    last_step: Literal["renoise", "midpoint"] = "renoise"
    random_tau_range: tuple[float, float] = (0.02, 0.98)


@dataclass
class FakeConfig:
    """The fake velocity model: flow matching on detached student samples, ``updates`` per student
    update (two time-scale update rule)."""

    updates: int = 2
    lr: float = 1e-4
    weight: float = 1.0
    grad_clip: float = 1.0


@dataclass
class GANConfig:
    """Multi-head discriminator on the fake model's block features (hinge loss).

    ``blocks``: indices of transformer blocks to hook (negative counts from the end). ``head``:
    ``conv`` (3x3 conv, GroupNorm, SiLU, 1x1 conv: a logit per latent cell) or ``linear`` (a logit
    per token). ``real``: ``teacher`` (the cached teacher samples of the trajectory stage) or
    ``renders`` (shapes-world renders encoded by the VAE). ``backbone_grad``: whether the
    discriminator loss also trains the fake model's blocks under the hooks (as DMD2 does)."""

    enabled: bool = True
    blocks: list[int] = field(default_factory=lambda: [-1])
    head: Literal["conv", "linear"] = "conv"
    head_channels: int = 64
    generator_weight: float = 0.01
    discriminator_weight: float = 0.1
    reinit_prob: float = 0.005
    real: Literal["teacher", "renders"] = "teacher"
    num_real: int = 256
    backbone_grad: bool = True


@dataclass
class StudentStageConfig:
    """Stage 1 (DMD + GAN): steps, student optimiser and LR warm-up."""

    steps: int = 300
    lr: float = 5e-5
    warmup: int = 20
    grad_clip: float = 1.0


@dataclass
class DistillConfig:
    """Everything one distillation run needs besides the teacher and the output folder.

    ``schedule``: the K student times, descending with ``t_1 = 1`` and without the final 0; empty
    means the METHOD.md default ``flow.sampling_schedule(K, shift)[:-1]`` with the teacher's shift.
    ``t5_dropout``: the rate at which the student's conditioning loses its T5 block (so one student
    serves with and without T5); teacher and fake always see the full conditioning.
    """

    student_steps: int = 4
    schedule: list[float] = field(default_factory=list)
    guidance: float = 4.0
    batch_size: int = 16
    ema_decay: float = 0.99
    t5_dropout: float = 0.2
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    student: StudentStageConfig = field(default_factory=StudentStageConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    fake: FakeConfig = field(default_factory=FakeConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    num_prompts: int = 4000
    checkpoint_every: int = 100
    sample_every: int = 200
    probe_every: int = 100
    probe_images: int = 16
    collapse_ratio: float = 0.35
    collapse_patience: int = 2
    log_every: int = 10
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        if self.student_steps not in STUDENT_STEPS:
            raise ConfigError(f"student_steps must be one of {list(STUDENT_STEPS)}, got {self.student_steps}")
        if self.schedule:
            s = self.schedule
            if len(s) != self.student_steps or abs(s[0] - 1.0) > 1e-9 or any(b >= a for a, b in zip(s, s[1:])) \
                    or s[-1] <= 0:
                raise ConfigError(f"schedule must hold {self.student_steps} descending times in (0, 1] starting at 1.0, "
                                  f"got {s}")
        for name, v in (("batch_size", self.batch_size), ("trajectory.batch_size", self.trajectory.batch_size),
                        ("fake.updates", self.fake.updates), ("trajectory.teacher_steps", self.trajectory.teacher_steps)):
            if v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        if self.trajectory.teacher_steps % self.student_steps:
            raise ConfigError(f"trajectory.teacher_steps ({self.trajectory.teacher_steps}) must be a multiple of "
                              f"student_steps ({self.student_steps}) so the teacher passes through every student time")
        if not 0.0 <= self.t5_dropout <= 1.0:
            raise ConfigError(f"t5_dropout must be in [0, 1], got {self.t5_dropout}")
        lo, hi = self.dmd.random_tau_range
        if not 0.0 < lo < hi <= 1.0:
            raise ConfigError(f"dmd.random_tau_range must satisfy 0 < lo < hi <= 1, got {[lo, hi]}")
        if self.gan.enabled and not self.gan.blocks:
            raise ConfigError("gan.blocks must name at least one transformer block when gan.enabled is true")

    def student_schedule(self, shift: float) -> list[float]:
        """The K student times ``t_1 = 1 > ... > t_K`` (no final 0): the configured list, or K
        uniform points through the teacher's shift, ``flow.sampling_schedule(K, shift)[:-1]``."""
        if self.schedule:
            return [float(t) for t in self.schedule]
        return flow.sampling_schedule(self.student_steps, shift)[:-1]


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise UserError(f"unknown distill preset '{name}'; choose one of {', '.join(PRESETS)}")
    return CONFIG_DIR / f"toy-distill-{name}.yaml"


def load_distill_config(preset: str | None = None, path: str | None = None) -> DistillConfig:
    """Load a preset by name or a YAML file (``--config``), strictly."""
    if path is not None:
        return load_config(DistillConfig, path)
    return load_config(DistillConfig, preset_path(preset or "default"))
