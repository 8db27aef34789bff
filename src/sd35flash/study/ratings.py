"""Rating math for pairwise votes: Bradley-Terry strengths on the ELO scale, bootstrap CIs over
prompts, win rates, annotator agreement and the votes still needed to separate two models.

Votes enter as counts: ``W[i, j]`` = wins of model ``i`` over ``j``, a tie counting half a win to
each side (the convention of evalica and of Chatbot Arena).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ELO_BASE = 1000.0
ELO_SCALE = 400.0
Z95 = 1.959963984540054


def win_counts(a: Sequence[int], b: Sequence[int], winner: Sequence[str], n_models: int,
               groups: Sequence[int] | None = None, n_groups: int = 1) -> np.ndarray:
    """Counts ``(n_groups, M, M)``: ``W[g, i, j]`` wins of ``i`` over ``j`` in group ``g`` (ties: half each).

    ``a``/``b`` are model indices of the two sides, ``winner`` is ``"a"``, ``"b"`` or ``"tie"``."""
    w = np.zeros((n_groups, n_models, n_models))
    g = np.zeros(len(a), dtype=int) if groups is None else np.asarray(groups, dtype=int)
    a, b = np.asarray(a, dtype=int), np.asarray(b, dtype=int)
    win = np.asarray(winner)
    for side, other, weight in ((a, b, (win == "a") + 0.5 * (win == "tie")),
                                (b, a, (win == "b") + 0.5 * (win == "tie"))):
        np.add.at(w, (g, side, other), weight)
    return w


def bradley_terry(w: np.ndarray, prior: float = 0.01, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """Maximum-likelihood Bradley-Terry strengths for one ``(M, M)`` or a batch ``(R, M, M)`` of win counts.

    Model: ``P(i beats j) = p_i / (p_i + p_j) = sigmoid(theta_i - theta_j)`` with ``theta = log p``.
    The log-likelihood ``L = sum_ij W_ij log P_ij`` is maximised by Newton's method, vectorised
    over the batch::

        g_i  = sum_j (W_ij - N_ij P_ij),          N_ij = W_ij + W_ji
        H_ij = N_ij P_ij (1 - P_ij) (i != j),     H_ii = -sum_j H_ij
        theta <- theta + clip(( -H + 1 1^T / M )^-1 g)

    (the ``1 1^T`` term fixes the free shift of ``theta``; steps are clipped to 2 for safety), then
    ``theta`` is centred, so ``p`` has geometric mean 1. ``prior`` adds that many virtual ties to
    every pair of models (half a win each way), which keeps a model with no wins at a finite
    strength; 0 gives the plain maximum-likelihood fit (which needs every model to win and lose)."""
    w = np.asarray(w, dtype=float)
    single = w.ndim == 2
    w = w[None] if single else w
    m = w.shape[-1]
    w = w + 0.5 * prior * (1.0 - np.eye(m))
    n = w + np.swapaxes(w, 1, 2)
    theta = np.zeros(w.shape[:2])
    ones = np.full((m, m), 1.0 / m)
    for _ in range(max_iter):
        prob = 1.0 / (1.0 + np.exp(theta[:, None, :] - theta[:, :, None]))  # P_ij = sigmoid(theta_i - theta_j)
        grad = (w - n * prob).sum(axis=2)
        curv = n * prob * (1.0 - prob)
        neg_h = np.einsum("rij,ij->rij", -curv, 1.0 - np.eye(m)) + np.einsum("ri,ij->rij", curv.sum(axis=2), np.eye(m))
        step = np.linalg.solve(neg_h + ones, grad[..., None])[..., 0]
        step = np.clip(step, -2.0, 2.0)
        theta = theta + step
        theta -= theta.mean(axis=1, keepdims=True)
        if np.max(np.abs(step)) < tol:
            break
    p = np.exp(theta)
    return p[0] if single else p


def elo_scale(p: np.ndarray) -> np.ndarray:
    """``elo_i = 1000 + 400 * log10(p_i)`` for strengths of geometric mean 1 (mean score 1000):
    an ELO gap ``d`` means ``P(win) = 1 / (1 + 10^(-d / 400))``."""
    return ELO_BASE + ELO_SCALE * np.log10(p)


def bootstrap_elo(w_groups: np.ndarray, resamples: int = 1000, seed: int = 0, prior: float = 0.01) -> np.ndarray:
    """ELO scores of ``resamples`` bootstrap replicates, resampling the groups (prompts) with replacement.

    ``w_groups`` is ``(G, M, M)``. Replicate ``r`` draws group counts ``c_r ~ Multinomial(G, 1/G)`` and
    fits ``W_r = sum_g c_rg W_g``, all replicates in one batched fit. Returns ``(resamples, M)``."""
    g = w_groups.shape[0]
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(g, np.full(g, 1.0 / g), size=resamples).astype(float)
    w_r = np.einsum("rg,gij->rij", counts, w_groups)
    return elo_scale(bradley_terry(w_r, prior=prior))


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    lo = (1.0 - level) / 2 * 100
    return np.percentile(samples, lo, axis=0), np.percentile(samples, 100 - lo, axis=0)


def win_rates(w: np.ndarray) -> np.ndarray:
    """``R[i, j] = W_ij / (W_ij + W_ji)``; NaN where the two never met (and on the diagonal)."""
    n = w + w.T
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(n > 0, w / np.where(n > 0, n, 1.0), np.nan)
    np.fill_diagonal(r, np.nan)
    return r


def votes_to_separate(p_i: float, p_j: float, votes_so_far: float, z: float = Z95) -> float | None:
    """Further head-to-head votes until a ``z`` confidence interval on ``P(i beats j)`` excludes 1/2.

    With ``q = p_i / (p_i + p_j)`` from the fit, the normal interval ``q +- z sqrt(q (1 - q) / n)``
    excludes 1/2 once ``n >= z^2 q (1 - q) / (q - 1/2)^2``; the answer is that ``n`` minus the votes
    already cast between the two (at least 0). ``None`` when the fit says they are equal."""
    q = p_i / (p_i + p_j)
    if abs(q - 0.5) < 1e-9:
        return None
    n = z * z * q * (1 - q) / (q - 0.5) ** 2
    return float(max(0, math.ceil(n - votes_so_far)))


def krippendorff_alpha(matrix: np.ndarray) -> float | None:
    """Krippendorff's alpha (ordinal) of a coders x units matrix (NaN = not rated), via the
    ``krippendorff`` package; ``None`` when no unit has two ratings or all ratings agree trivially."""
    import krippendorff

    if matrix.size == 0 or not np.any((~np.isnan(matrix)).sum(axis=0) >= 2):
        return None
    vals = matrix[~np.isnan(matrix)]
    if np.unique(vals).size < 2:
        return None
    return float(krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal"))
