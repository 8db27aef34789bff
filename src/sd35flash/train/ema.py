"""Exponential moving averages of weights, and the loop hook that updates them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from diffusers.training_utils import EMAModel

from .loop import Hook, Stage
from .sharding import local_tensors


class EMA(EMAModel):
    """diffusers' :class:`EMAModel` over the parameters this process holds: every method that takes
    ``parameters`` maps sharded ones to their local shards (:func:`.sharding.local_tensors`), so
    under FSDP2 it is the EMA of the local shards; for whole parameters it is ``EMAModel`` itself."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], **kwargs) -> None:
        super().__init__(local_tensors(parameters), **kwargs)

    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        super().step(local_tensors(parameters))

    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        super().copy_to(local_tensors(parameters))

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        super().store(local_tensors(parameters))

    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        super().restore(local_tensors(parameters))


def anchored_ema(params: Iterable[torch.nn.Parameter], decay: float) -> EMA:
    """EMA that starts at the current weights and uses the constant ``decay`` from the first update:
    ``ema <- decay * ema + (1 - decay) * w`` (diffusers' EMAModel with its warm-up switched off:
    ``min_decay = decay``, ``update_after_step = -1``)."""
    return EMA(params, decay=decay, min_decay=decay, update_after_step=-1)


class OffloadedEMA(EMA):
    """An :class:`EMAModel` whose shadow weights live on ``device`` (e.g. the CPU while the model
    trains on a GPU): each update brings the live weights to ``device`` first, so
    ``ema <- ema - (1 - decay) (ema - w)`` runs there; ``copy_to`` / ``store`` move back as usual."""

    def __init__(self, params: Iterable[torch.nn.Parameter], device: torch.device | str, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.to(device)
        self.home = torch.device(device)

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> None:  # the shadow stays home
        home = getattr(self, "home", None)
        super().to(device=home if home is not None else device, dtype=dtype, non_blocking=non_blocking)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        moved = []
        for p in local_tensors(parameters):
            q = p.detach().to(self.home)
            moved.append(q.requires_grad_(p.requires_grad) if q.is_floating_point() else q)
        super().step(moved)


class EMAHook(Hook):
    """``ema.step(params())`` after every step of the stages named in ``stages`` (every stage when
    ``None``)."""

    def __init__(self, ema: EMAModel, params: Callable[[], Iterable[torch.nn.Parameter]],
                 stages: set[str] | None = None) -> None:
        self.ema, self.params, self.stages = ema, params, stages

    def after_step(self, step: int, stage: Stage) -> None:
        if self.stages is None or stage.name in self.stages:
            self.ema.step(self.params())
