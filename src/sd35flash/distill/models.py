"""The models of distillation: frozen teacher, trainable student and fake copies, frozen encoders.

* **teacher** ("real"): the pipeline's transformer, frozen (``requires_grad=False``, eval), optionally
  held in bf16/fp16 behind :class:`CastTeacher`;
* **student**: a trainable copy of the teacher transformer (the generator);
* **fake**: a trainable copy of the teacher transformer (the proxy of the student's distribution);
* text encoders and VAE: frozen; prompts are encoded under ``no_grad`` by a conditioning provider
  (:mod:`.conditioning`).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from collections.abc import Iterator

import torch
from diffusers import StableDiffusion3Pipeline

from ..models.pipeline_io import load_pipeline
from .conditioning import Conditioner


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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextmanager
def checkpointing_off(module: torch.nn.Module) -> Iterator[None]:
    """Temporarily switch off gradient checkpointing of a diffusers ``module``. A network whose
    weights are frozen only for the duration of a forward (:func:`params_frozen`) cannot be
    checkpointed: its blocks would be recomputed in backward with the weights requiring grad again,
    a different graph."""
    saved = bool(getattr(module, "gradient_checkpointing", False))
    module.gradient_checkpointing = False
    try:
        yield
    finally:
        module.gradient_checkpointing = saved


class CastTeacher(torch.nn.Module):
    """A frozen transformer held in ``dtype``: floating inputs (latents, text embeddings) are cast to
    ``dtype`` (the timestep stays fp32), the velocity comes back in fp32. ``config`` is the wrapped
    model's."""

    def __init__(self, transformer: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = transformer.to(dtype)
        self.dtype = dtype

    @property
    def config(self):
        return self.inner.config

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, return_dict: bool = False):
        out = self.inner(hidden_states=hidden_states.to(self.dtype), timestep=timestep,
                         encoder_hidden_states=encoder_hidden_states.to(self.dtype),
                         pooled_projections=pooled_projections.to(self.dtype), return_dict=False)
        return (out[0].float(),)


ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class DistillModels:
    """Teacher pipeline (frozen), student and fake transformers (trainable copies), conditioner.

    ``teacher_dtype`` other than fp32 casts the teacher transformer after the trainable copies are
    made (they stay in the loaded precision); ``gradient_checkpointing`` switches it on for the
    student and the fake (and so for branches copied from the student)."""

    def __init__(self, pipe: StableDiffusion3Pipeline, teacher_dtype: str = "fp32",
                 gradient_checkpointing: bool = False) -> None:
        self.pipe = pipe
        for name in ("transformer", "vae", *ENCODERS):
            mod = getattr(pipe, name, None)
            if mod is not None:
                freeze(mod)
        self.student = trainable_copy(pipe.transformer)
        self.fake = trainable_copy(pipe.transformer)
        if gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
            self.fake.enable_gradient_checkpointing()
        dtype = DTYPES[teacher_dtype]
        self.teacher = pipe.transformer if dtype == torch.float32 else CastTeacher(pipe.transformer, dtype)
        self.conditioner = Conditioner(pipe)
        self._parked: dict[str, torch.nn.Module] = {}

    @classmethod
    def load(cls, teacher: str, revision: str | None = None, teacher_dtype: str = "fp32",
             gradient_checkpointing: bool = False) -> DistillModels:
        """Load the teacher pipeline (local folder or hub id; one-line errors from ``load_pipeline``)."""
        return cls(load_pipeline(teacher, revision=revision), teacher_dtype, gradient_checkpointing)

    def park_encoders(self) -> None:
        """Move the text encoders to the CPU and out of the pipeline (nothing can encode until
        :meth:`unpark_encoders`): after a precompute of every prompt, they hold no device memory."""
        for name in ENCODERS:
            mod = getattr(self.pipe, name, None)
            if mod is not None:
                self._parked[name] = mod.to("cpu")
                setattr(self.pipe, name, None)

    def unpark_encoders(self) -> None:
        """Put parked encoders back into the pipeline (on the CPU; export saves them from there)."""
        for name, mod in self._parked.items():
            setattr(self.pipe, name, mod)
        self._parked = {}

    @property
    def shift(self) -> float:
        return float(self.pipe.scheduler.config.get("shift", 1.0))

    def latent_shape(self) -> tuple[int, int, int]:
        c = self.teacher.config
        return (int(c.in_channels), int(c.sample_size), int(c.sample_size))
