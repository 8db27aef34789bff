"""The models of distillation: frozen teacher, trainable student and fake copies, frozen encoders.

* **teacher** ("real"): the pipeline's transformer, frozen (``requires_grad=False``, eval);
* **student**: a trainable copy of the teacher transformer (the generator);
* **fake**: a trainable copy of the teacher transformer (the proxy of the student's distribution);
* text encoders and VAE: frozen; prompts are encoded under ``no_grad``.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from collections.abc import Iterator, Sequence

import torch
from diffusers import StableDiffusion3Pipeline

from ..models.pipeline_io import load_pipeline
from ..sampling import PromptEmbeds, clip_length, drop_encoders, encode_prompts


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """``requires_grad=False`` on every parameter, and eval mode."""
    module.requires_grad_(False)
    return module.eval()


def trainable_copy(transformer: torch.nn.Module) -> torch.nn.Module:
    """An independent, trainable copy of ``transformer`` (student or fake initialised from the teacher)."""
    twin = copy.deepcopy(transformer)
    twin.requires_grad_(True)
    return twin.train()


@contextmanager
def params_frozen(module: torch.nn.Module) -> Iterator[None]:
    """Temporarily switch off ``requires_grad`` so gradients pass *through* ``module`` to its input
    without touching its weights (the fake model in the student's loss)."""
    saved = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(module.parameters(), saved):
            p.requires_grad_(r)


class Conditioner:
    """Encodes prompts with the teacher's frozen text encoders (no gradients).

    ``full`` is the conditioning teacher and fake see; ``for_student`` zeroes the T5 block of a
    sample where ``drop_t5`` is true (the pipeline's own no-T5 input), so one student serves both.
    """

    def __init__(self, pipe: StableDiffusion3Pipeline) -> None:
        self.pipe = pipe
        self._uncond: PromptEmbeds | None = None

    @torch.no_grad()
    def full(self, prompts: Sequence[str], device: torch.device | str) -> PromptEmbeds:
        return encode_prompts(self.pipe, list(prompts), device=device)

    def for_student(self, cond: PromptEmbeds, drop_t5: torch.Tensor) -> PromptEmbeds:
        no_clip = torch.zeros_like(drop_t5, dtype=torch.bool)
        return drop_encoders(cond, clip_length(self.pipe), no_clip, drop_t5.bool())

    @torch.no_grad()
    def uncond(self, batch: int, device: torch.device | str) -> PromptEmbeds:
        """The CFG negative: the empty prompt, encoded once."""
        if self._uncond is None:
            self._uncond = encode_prompts(self.pipe, [""], device=device)
        u = self._uncond.to(device)
        return PromptEmbeds(u.embeds.expand(batch, -1, -1), u.pooled.expand(batch, -1))


class DistillModels:
    """Teacher pipeline (frozen), student and fake transformers (trainable copies), conditioner."""

    def __init__(self, pipe: StableDiffusion3Pipeline) -> None:
        self.pipe = pipe
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            mod = getattr(pipe, name, None)
            if mod is not None:
                freeze(mod)
        self.teacher = pipe.transformer
        self.student = trainable_copy(self.teacher)
        self.fake = trainable_copy(self.teacher)
        self.conditioner = Conditioner(pipe)

    @classmethod
    def load(cls, teacher: str, revision: str | None = None) -> DistillModels:
        """Load the teacher pipeline (local folder or hub id; one-line errors from ``load_pipeline``)."""
        return cls(load_pipeline(teacher, revision=revision))

    @property
    def shift(self) -> float:
        return float(self.pipe.scheduler.config.get("shift", 1.0))

    def latent_shape(self) -> tuple[int, int, int]:
        c = self.teacher.config
        return (int(c.in_channels), int(c.sample_size), int(c.sample_size))
