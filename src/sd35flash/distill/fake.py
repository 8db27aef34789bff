"""The fake velocity model's objective: flow matching on detached student samples (METHOD.md).

``L_fake = || v_fake((1 - tau) x0_s + tau eps, tau) - (eps - x0_s) ||^2`` where ``x0_s`` is a
detached student sample and ``tau`` is drawn like the DMD evaluation times (the shared timesteps
with timestep sharing, random ``tau`` without), so the fake learns the student's velocity field
exactly where the distribution-matching loss reads it (``fake.mixture: shared``); with
``uniform_steps``, ``tau`` is uniform in ``dmd.random_tau_range`` whatever the sample's step, so at
every ``tau`` the fake models the mixture of all steps' ``x0`` predictions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import flow


def fake_input(x0_s: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The noised student sample ``x_tau = (1 - tau) x0_s + tau eps`` (``x0_s`` detached)."""
    return flow.interpolate(x0_s.detach(), eps, tau)


def fake_flow_loss(v_fake: torch.Tensor, x0_s: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``|| v_fake - (eps - x0_s) ||^2``, mean over elements."""
    return F.mse_loss(v_fake.float(), flow.target_velocity(x0_s.detach(), eps).float())


def fake_tau(mixture: str, dmd_tau: torch.Tensor, u: torch.Tensor | None,
             tau_range: tuple[float, float]) -> torch.Tensor:
    """The fake's training times: ``dmd_tau`` (``shared``) or ``lo + (hi - lo) u`` (``uniform_steps``)."""
    if mixture == "shared":
        return dmd_tau
    lo, hi = tau_range
    return lo + (hi - lo) * u
