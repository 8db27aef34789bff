"""Rectified-flow math in the SD3 convention.

``x_t = (1 - t) * x0 + t * eps`` with ``t`` in [0, 1]: ``t = 1`` is pure noise, ``t = 0`` is data.
A velocity model predicts ``v(x_t, t, c) ~= eps - x0``. diffusers' SD3 transformer takes
``timestep = 1000 * t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

TIMESTEP_SCALE = 1000.0


def _bcast(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """Reshape a per-sample ``t`` of shape (B,) to (B, 1, 1, ...) so it broadcasts against ``like``."""
    if isinstance(t, torch.Tensor) and t.ndim == 1:
        return t.view(-1, *([1] * (like.ndim - 1)))
    return t


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The straight path: ``x_t = (1 - t) * x0 + t * eps``."""
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * eps


def target_velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target: ``v = eps - x0``."""
    return eps - x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Data prediction implied by a velocity: ``x0_hat = x_t - t * v``."""
    return x_t - _bcast(t, x_t) * v


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Noise prediction implied by a velocity: ``eps_hat = x_t + (1 - t) * v``."""
    return x_t + (1 - _bcast(t, x_t)) * v


def euler_step(
    x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, s: torch.Tensor | float
) -> torch.Tensor:
    """One Euler step from ``t`` to ``s``: ``x_s = x_t + (s - t) * v``.

    It equals ``(1 - s) * x0_hat + s * eps_hat``: it moves along the straight line the prediction implies.
    """
    return x_t + (_bcast(s, x_t) - _bcast(t, x_t)) * v


def shift_t(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3 timestep shift: ``t' = shift * t / (1 + (shift - 1) * t)``. ``shift = 1`` is the identity."""
    return shift * t / (1 + (shift - 1) * t)


def unshift_t(t_shifted: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Inverse of :func:`shift_t`: ``t = t' / (shift - (shift - 1) * t')``."""
    return t_shifted / (shift - (shift - 1) * t_shifted)


def apply_cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``v_cfg = v_uncond + w * (v_cond - v_uncond)``."""
    return v_uncond + scale * (v_cond - v_uncond)


def sample_logit_normal(
    n: int,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training timesteps ``t = shift_t(sigmoid(u), shift)`` with ``u ~ N(mean, std^2)`` (SD3 Sec. 3.1)."""
    u = torch.randn(n, generator=generator, device="cpu") * std + mean
    t = torch.sigmoid(u)
    return shift_t(t, shift).to(device)


@dataclass(frozen=True)
class Schedule:
    """The times of a K-step Euler sampler: ``t_0 > t_1 > ... > t_K = 0``, K + 1 of them.

    Step ``i`` (0-based) goes from ``t_i`` to ``t_{i+1}``; the model is evaluated at the K
    :attr:`step_times` ``t_0 .. t_{K-1}``, which is what recipes and ``sd35flash.json`` store
    (:meth:`from_step_times` adds the final 0 back). It reads as the sequence of its K + 1 times.
    """

    times: tuple[float, ...]

    def __post_init__(self) -> None:
        ts = tuple(float(t) for t in self.times)
        object.__setattr__(self, "times", ts)
        if len(ts) < 2 or ts[-1] != 0.0 or not all(0.0 <= t <= 1.0 for t in ts) \
                or any(b >= a for a, b in zip(ts, ts[1:])):
            raise ValueError(f"a schedule needs at least two strictly descending times in [0, 1] ending at 0, "
                             f"got {list(ts)}")

    @classmethod
    def from_step_times(cls, step_times: Sequence[float]) -> Schedule:
        """The schedule whose K steps start at ``step_times`` (descending, without the final 0)."""
        return cls((*step_times, 0.0))

    @classmethod
    def of(cls, times: Schedule | Sequence[float]) -> Schedule:
        """``times`` itself, or the schedule of K + 1 times ending at 0."""
        return times if isinstance(times, Schedule) else cls(tuple(times))

    @property
    def steps(self) -> int:
        """K, the number of Euler steps."""
        return len(self.times) - 1

    @property
    def step_times(self) -> list[float]:
        """The K times the model is evaluated at, ``t_0 .. t_{K-1}`` (no final 0)."""
        return list(self.times[:-1])

    def pairs(self) -> list[tuple[float, float]]:
        """``(t_i, t_{i+1})`` for each step ``i``."""
        return list(zip(self.times[:-1], self.times[1:]))

    def to_list(self) -> list[float]:
        return list(self.times)

    def __len__(self) -> int:
        return len(self.times)

    def __iter__(self) -> Iterator[float]:
        return iter(self.times)

    def __getitem__(self, i: int | slice) -> float | tuple[float, ...]:
        return self.times[i]


def sampling_schedule(steps: int, shift: float) -> Schedule:
    """``steps + 1`` times from 1 to 0: uniform points ``1 - i / steps`` passed through :func:`shift_t`.

    This is the schedule diffusers' FlowMatchEulerDiscreteScheduler uses for SD3 (``shift`` applied
    to linearly spaced sigmas), so our sampler and the stock pipeline visit the same points.
    With ``shift = 3`` and 4 steps: ``[1.0, 0.9, 0.75, 0.5, 0.0]``.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    pts = [1.0 - i / steps for i in range(steps + 1)]
    return Schedule(tuple(float(shift_t(p, shift)) if p > 0 else 0.0 for p in pts))


Velocity = Callable[[int, float, torch.Tensor], torch.Tensor]
StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def euler_sample(velocity: Velocity, x: torch.Tensor, schedule: Schedule, steps: int | None = None,
                 after_step: StepHook | None = None) -> torch.Tensor:
    """Euler integration along ``schedule``: ``x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)``.

    ``velocity(i, t_i, x_i)`` gives step ``i``'s velocity (cast to ``x``'s dtype). Runs the first
    ``steps`` steps (all K by default) and returns the last state; ``after_step(i, x_i, v_i, x_{i+1})``
    sees every step. The one loop behind sampling, student rollouts and teacher trajectories.
    """
    for i, (t, s) in enumerate(schedule.pairs()[:steps]):
        v = velocity(i, t, x).to(x.dtype)
        x_next = euler_step(x, v, t, s)
        if after_step is not None:
            after_step(i, x, v, x_next)
        x = x_next
    return x


def model_timestep(t: torch.Tensor | float, batch: int, device: torch.device | str) -> torch.Tensor:
    """The ``timestep`` argument diffusers' SD3 transformer expects: ``1000 * t`` with shape (B,)."""
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t))
    t = t.to(device=device, dtype=torch.float32)
    if t.ndim == 0:
        t = t.expand(batch)
    return t * TIMESTEP_SCALE


def logit_normal_density(t: float, mean: float = 0.0, std: float = 1.0) -> float:
    """Density of the logit-normal distribution at ``t`` (for plots and weighting checks)."""
    if not 0.0 < t < 1.0:
        return 0.0
    u = math.log(t / (1 - t))
    return math.exp(-0.5 * ((u - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi) * t * (1 - t))
