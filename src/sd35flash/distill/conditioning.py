"""Conditioning providers: where a distillation run's prompt embeddings come from.

A provider answers three questions, the same way whatever it is backed by:

* ``full(prompts, device)``: the conditioning teacher and fake see;
* ``for_student(cond, drop_t5)``: the student's, with the T5 block zeroed where ``drop_t5`` is true
  (the stock pipeline's input without T5), so one student serves with and without T5;
* ``uncond(batch, device)``: the CFG negative, the empty prompt.

:class:`Conditioner` encodes with the pipeline's live text encoders; :class:`PrecomputedConditioner`
looks rows up in a table encoded once (:func:`precompute`), after which the encoders can leave the
device (``DistillModels.park_encoders``). A precomputed store written by ``sd35flash prepare`` is one
more table source for the same class.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import torch
from diffusers import StableDiffusion3Pipeline

from ..errors import UserError
from ..sampling import PromptEmbeds, clip_length, drop_encoders, encode_prompts


class ConditioningProvider(Protocol):
    def full(self, prompts: Sequence[str], device: torch.device | str) -> PromptEmbeds: ...

    def for_student(self, cond: PromptEmbeds, drop_t5: torch.Tensor) -> PromptEmbeds: ...

    def uncond(self, batch: int, device: torch.device | str) -> PromptEmbeds: ...


def student_conditioning(cond: PromptEmbeds, clip_len: int, drop_t5: torch.Tensor) -> PromptEmbeds:
    """``cond`` with the T5 block (tokens after the first ``clip_len``) zeroed where ``drop_t5``."""
    no_clip = torch.zeros_like(drop_t5, dtype=torch.bool)
    return drop_encoders(cond, clip_len, no_clip, drop_t5.bool())


class Conditioner:
    """Encodes prompts with the pipeline's frozen text encoders (no gradients), every call."""

    def __init__(self, pipe: StableDiffusion3Pipeline) -> None:
        self.pipe = pipe
        self._uncond: PromptEmbeds | None = None

    @torch.no_grad()
    def full(self, prompts: Sequence[str], device: torch.device | str) -> PromptEmbeds:
        return encode_prompts(self.pipe, list(prompts), device=device)

    def for_student(self, cond: PromptEmbeds, drop_t5: torch.Tensor) -> PromptEmbeds:
        return student_conditioning(cond, clip_length(self.pipe), drop_t5)

    @torch.no_grad()
    def uncond(self, batch: int, device: torch.device | str) -> PromptEmbeds:
        """The CFG negative: the empty prompt, encoded once."""
        if self._uncond is None:
            self._uncond = encode_prompts(self.pipe, [""], device=device)
        u = self._uncond.to(device)
        return PromptEmbeds(u.embeds.expand(batch, -1, -1), u.pooled.expand(batch, -1))


class PrecomputedConditioner:
    """Prompt embeddings looked up in a table ``prompt -> row`` of ``embeds`` (N, L, D) and ``pooled``
    (N, P), held on the CPU; rows are moved to the device per batch. A prompt outside the table is
    an error that names it."""

    def __init__(self, prompts: Sequence[str], embeds: torch.Tensor, pooled: torch.Tensor, clip_len: int) -> None:
        self.row = {p: i for i, p in enumerate(prompts)}
        self.embeds, self.pooled, self.clip_len = embeds, pooled, clip_len
        if "" not in self.row:
            raise ValueError("a precomputed table needs the empty prompt (the CFG negative)")

    def __len__(self) -> int:
        return len(self.row)

    def full(self, prompts: Sequence[str], device: torch.device | str) -> PromptEmbeds:
        try:
            idx = torch.tensor([self.row[p] for p in prompts], dtype=torch.long)
        except KeyError as e:
            raise UserError(f"prompt {e.args[0]!r} has no precomputed embedding; precompute every prompt the run "
                            "uses (or use memory.conditioning: live)") from None
        return PromptEmbeds(self.embeds[idx].to(device), self.pooled[idx].to(device))

    def for_student(self, cond: PromptEmbeds, drop_t5: torch.Tensor) -> PromptEmbeds:
        return student_conditioning(cond, self.clip_len, drop_t5)

    def uncond(self, batch: int, device: torch.device | str) -> PromptEmbeds:
        u = self.full([""], device)
        return PromptEmbeds(u.embeds.expand(batch, -1, -1), u.pooled.expand(batch, -1))


@torch.no_grad()
def precompute(live: Conditioner, prompts: Iterable[str], device: torch.device | str,
               batch_size: int = 64) -> PrecomputedConditioner:
    """Encode every distinct prompt of ``prompts`` (and the empty prompt) once with ``live``'s
    encoders, in batches of ``batch_size``; the table is kept on the CPU."""
    names = list(dict.fromkeys([*prompts, ""]))
    parts = [live.full(names[i : i + batch_size], device).to("cpu") for i in range(0, len(names), batch_size)]
    table = PromptEmbeds.cat(parts)
    return PrecomputedConditioner(names, table.embeds, table.pooled, clip_length(live.pipe))
