"""Learning-rate schedules (from diffusers' optimisation helpers)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.1) -> LambdaLR:
    """Linear warm-up for ``warmup`` steps, then cosine decay from 1 to ``min_ratio`` at ``total``:
    ``lr(s) = base * (min + (1 - min) * 0.5 * (1 + cos(pi * (s - w) / (T - w))))``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return LambdaLR(optimizer, f)
