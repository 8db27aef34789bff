"""Optimisers by name, and freeing the state of an optimiser that is done."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit")


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, kind: str = "adamw",
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``adamw``: ``torch.optim.AdamW``. ``adamw8bit``: AdamW with 8-bit block-quantised moments
    (bitsandbytes' ``AdamW8bit`` on CUDA when it is installed, else torchao's ``AdamW8bit``, which
    also steps on the CPU; torchao keeps tensors under 4096 elements in full precision). Sharded
    parameters (FSDP2's ``DTensor``) always get torchao's, which quantises each process's shard."""
    params = list(params)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw8bit":
        from torch.distributed.tensor import DTensor

        if params and params[0].is_cuda and not any(isinstance(p, DTensor) for p in params):
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
            except ImportError:
                pass
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}")


def free_state(optimizer: torch.optim.Optimizer) -> None:
    """Drop every per-parameter state (moments, step counts) of ``optimizer`` (or the optimiser a
    prepared wrapper holds), so its memory is released; the parameters stay."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.state.clear()
