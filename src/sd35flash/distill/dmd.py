"""Loss 1: distribution matching (DMD) for flows, with timestep sharing (METHOD.md, Loss 1).

At a point ``(x_tau, tau)`` the student is pushed along ``x0_fake - x0_real = tau (v_real - v_fake)``
through the surrogate ``L_dm = 0.5 || x0_hat - sg(x0_hat - (x0_fake - x0_real) / norm) ||^2`` with
``norm = mean |x0_hat - x0_real|`` per sample.

Where ``(x_tau, tau)`` comes from:

* **timestep sharing** (default): ``tau`` is a student time below ``t_i``, and ``x_tau`` is reached by
  moving the student's input along its own predicted velocity, ``x_tau = x_{t_i} + (tau - t_i) v``,
  which is ``(1 - tau) x0_hat + tau eps_hat``: no fresh noise;
* **below** (``tau: below``): ``tau`` uniform in ``(lo, t_i)`` on the same line, for every step;
* **fresh noise** (``noise: fresh``): the shared ``tau`` as above, but ``x_tau = (1 - tau) x0_hat +
  tau eps`` with fresh Gaussian ``eps`` instead of the student's own ``eps_hat``, which is not Gaussian
  noise independent of ``x0_hat``: the teacher and the fake are then read on the noised marginals
  they were trained on;
* **vanilla re-noising** (``timestep_sharing: false``): ``tau ~ U(random_tau_range)`` and
  ``x_tau = (1 - tau) x0_hat + tau eps`` with fresh noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import flow
from .config import DMDConfig
from .rollout import bcast, times_at


@dataclass
class EvalPoints:
    """Per-sample evaluation times ``tau`` and whether the sample is re-noised with fresh noise."""

    tau: torch.Tensor
    renoise: torch.Tensor


def evaluation_times(idx: torch.Tensor, schedule: Sequence[float], cfg: DMDConfig, u: torch.Tensor,
                     pick: torch.Tensor) -> EvalPoints:
    """``tau`` for a sample at student step ``i = idx`` (0-based; ``schedule`` holds K + 1 times).

    With sharing: ``tau = t_{i+1}`` (the next shared time below ``t_i``) on the student's line. The
    last step has no shared time below it: ``renoise`` re-noises at a shared time drawn from
    ``t_2..t_K`` (``pick`` chooses which), or at a random ``tau`` when K = 1; ``midpoint`` stays on the
    line at ``t_K / 2``. Without sharing: ``tau = lo + (hi - lo) u`` and fresh noise for all.
    ``u`` and ``pick`` are uniform [0, 1) draws of shape (B,).
    With ``cfg.tau == "below"`` (and sharing), every step is read on its own line at
    ``tau = lo + (t_i - lo) u``, uniform below its own time. With ``cfg.noise == "fresh"`` (and
    sharing) every sample is re-noised at its ``tau``.
    """
    k = schedule.steps
    lo, hi = cfg.random_tau_range
    random_tau = lo + (hi - lo) * u
    if not cfg.timestep_sharing:
        return EvalPoints(random_tau, torch.ones_like(idx, dtype=torch.bool))
    fresh = cfg.noise == "fresh"
    if cfg.tau == "below":
        t_i = times_at(schedule, idx)
        return EvalPoints(lo + (t_i - lo) * u, torch.full_like(idx, fresh, dtype=torch.bool))
    last = idx == k - 1
    tau = times_at(schedule, (idx + 1).clamp(max=k))
    if cfg.last_step == "midpoint":
        tau = torch.where(last, times_at(schedule, idx) / 2, tau)
        return EvalPoints(tau, torch.full_like(last, fresh))
    if k >= 2:
        shared = torch.tensor(list(schedule.times[1:k]), dtype=torch.float32, device=idx.device)
        choice = shared[(pick * len(shared)).long().clamp(max=len(shared) - 1)]
    else:
        choice = random_tau
    return EvalPoints(torch.where(last, choice, tau), last | fresh)


def evaluation_point(x_i: torch.Tensor, v: torch.Tensor, t_i: torch.Tensor, pts: EvalPoints,
                     eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_tau, x0_hat)`` for the student's velocity ``v`` at ``(x_{t_i}, t_i)``.

    On the line: ``x_tau = x_{t_i} + (tau - t_i) v = (1 - tau) x0_hat + tau eps_hat``; re-noised:
    ``x_tau = (1 - tau) x0_hat + tau eps``. Both carry the student's gradient through ``x0_hat``.
    """
    x0_hat = flow.x0_from_v(x_i, v, t_i)
    on_line = flow.euler_step(x_i, v, t_i, pts.tau)
    renoised = flow.interpolate(x0_hat, eps, pts.tau)
    return torch.where(bcast(pts.renoise, x_i), renoised, on_line), x0_hat


@dataclass
class DMDResult:
    loss: torch.Tensor
    grad_norm: torch.Tensor  # mean per-sample L2 norm of (x0_fake - x0_real) / norm


def dmd_loss(x0_hat: torch.Tensor, x_tau: torch.Tensor, tau: torch.Tensor, v_real: torch.Tensor,
             v_fake: torch.Tensor) -> DMDResult:
    """``L_dm = 0.5 || x0_hat - sg(x0_hat - (x0_fake - x0_real) / norm) ||^2`` (mean over elements),
    ``x0_fake - x0_real = tau (v_real - v_fake)``, ``norm = mean |x0_hat - x0_real|`` per sample."""
    x0_hat = x0_hat.float()
    with torch.no_grad():
        x_tau = x_tau.detach().float()
        x0_real = flow.x0_from_v(x_tau, v_real.float(), tau)
        x0_fake = flow.x0_from_v(x_tau, v_fake.float(), tau)
        dims = tuple(range(1, x0_hat.ndim))
        norm = (x0_hat - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-6)
        grad = (x0_fake - x0_real) / norm
        target = x0_hat - grad
    loss = 0.5 * F.mse_loss(x0_hat, target.detach())
    return DMDResult(loss, grad.flatten(1).norm(dim=1).mean())
