"""Rectified-flow math in the SD3 convention.

``x_t = (1 - t) * x0 + t * eps`` with ``t`` in [0, 1]: ``t = 1`` is pure noise, ``t = 0`` is data.
A velocity model predicts ``v(x_t, t, c) ~= eps - x0``. diffusers' SD3 transformer takes
``timestep = 1000 * t``.
"""

from __future__ import annotations

import math

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


def sampling_schedule(steps: int, shift: float) -> list[float]:
    """``steps + 1`` times from 1 to 0: uniform points ``1 - i / steps`` passed through :func:`shift_t`.

    This is the schedule diffusers' FlowMatchEulerDiscreteScheduler uses for SD3 (``shift`` applied
    to linearly spaced sigmas), so our sampler and the stock pipeline visit the same points.
    With ``shift = 3`` and 4 steps: ``[1.0, 0.9, 0.75, 0.5, 0.0]``.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    pts = [1.0 - i / steps for i in range(steps + 1)]
    return [float(shift_t(p, shift)) if p > 0 else 0.0 for p in pts]


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
