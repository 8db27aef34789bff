"""The models of distillation: frozen teacher, trainable student and fake copies, frozen encoders.

* **teacher** ("real"): the pipeline's transformer, frozen (``requires_grad=False``, eval), optionally
  held in bf16/fp16 behind :class:`CastTeacher`;
* **student**: a trainable copy of the teacher transformer (the generator);
* **fake**: a trainable copy of the teacher transformer (the proxy of the student's distribution);
* text encoders and VAE: frozen; prompts are encoded under ``no_grad`` by a conditioning provider
  (:mod:`.conditioning`).

In LoRA mode (``lora`` settings given) student, fake and split branches are instead LoRA adapters on
the pipeline's transformer, which stays frozen and is shared: each model is an
:class:`~sd35flash.models.lora.AdapterView` (its parameters are its adapter's), and the teacher is
the view with every adapter disabled, exactly the base. One copy of the weights serves all of them.

Under FSDP2 (a ``fsdp`` sharding given) no process other than 0 holds or reads a whole transformer:
process 0 loads the pipeline, the others load it without its transformer; student and fake are
built on the meta device everywhere, sharded and filled from process 0's teacher weights
(:meth:`~sd35flash.train.sharding.Sharded.materialise`); the teacher stays whole on process 0 (the
trajectory bank is built there) until :meth:`DistillModels.shard_teacher` shards it the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from ..models.lora import AdapterView, adapter_parameters, add_adapters, fused_copy, save_adapter
from ..models.pipeline_io import load_pipeline
from .conditioning import Conditioner
from .config import LoraSettings


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """``requires_grad=False`` on every parameter, and eval mode."""
    module.requires_grad_(False)
    return module.eval()


def trainable_copy(transformer: torch.nn.Module) -> torch.nn.Module:
    """An independent, trainable copy of ``transformer`` (student or fake initialised from the teacher)."""
    twin = copy.deepcopy(transformer)
    twin.requires_grad_(True)
    return twin.train()


def empty_transformer(config) -> SD3Transformer2DModel:
    """An SD3 transformer of ``config`` with its parameters on the meta device (no memory) and its
    buffers computed on the CPU (the position table), to be sharded and filled."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return SD3Transformer2DModel.from_config(config)


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
    student and the fake (and so for branches copied from the student).

    ``resolution`` (pixels, 0 or ``None``: the teacher's own) sets the latent side of every sample
    (:func:`~sd35flash.models.resolution.latent_side`; a one-line error when the teacher cannot take it).
    A pipeline loaded without text encoders (``distill --prepared``) has ``conditioner`` ``None``
    until the caller gives it a stored one.

    ``lora`` (LoRA mode): adapters ``student`` and ``fake`` on the shared frozen ``pipe.transformer``;
    ``teacher_dtype`` then holds the shared base in that dtype (the adapters stay fp32) and
    ``gradient_checkpointing`` applies to the base; ``lora_seed`` seeds the adapters' initialisation.

    ``sharding`` (a :class:`~sd35flash.train.sharding.Sharding`, kept as ``self.sharding``): of kind
    ``fsdp``, student and fake are sharded as they are made (see the module docstring); ``pipe``'s
    transformer is then ``None`` on every process but 0 and ``transformer_config`` gives its config."""

    def __init__(self, pipe: StableDiffusion3Pipeline, teacher_dtype: str = "fp32",
                 gradient_checkpointing: bool = False, lora: LoraSettings | None = None, lora_seed: int = 0,
                 resolution: int | None = None, sharding=None, transformer_config=None) -> None:
        from ..models.resolution import latent_side

        self.pipe = pipe
        self.sharding = sharding
        self.teacher_dtype = teacher_dtype
        self.transformer_config = pipe.transformer.config if pipe.transformer is not None else transformer_config
        self.side = latent_side(self.transformer_config, pipe.vae.config, resolution or None)
        self.lora, self.lora_seed = lora, lora_seed
        for name in ("transformer", "vae", *ENCODERS):
            mod = getattr(pipe, name, None)
            if mod is not None:
                freeze(mod)
        self.conditioner = Conditioner(pipe) if any(getattr(pipe, n, None) is not None for n in ENCODERS) else None
        self._parked: dict[str, torch.nn.Module] = {}
        self._teacher_whole = False
        if lora is not None:
            if self.sharded:
                raise ValueError("LoRA mode is not sharded: pass a ddp sharding")
            self._lora_models(teacher_dtype, gradient_checkpointing)
            return
        if self.sharded:
            self._sharded_models(gradient_checkpointing)
            return
        self.student = trainable_copy(pipe.transformer)
        self.fake = trainable_copy(pipe.transformer)
        if gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
            self.fake.enable_gradient_checkpointing()
        dtype = DTYPES[teacher_dtype]
        self.teacher = pipe.transformer if dtype == torch.float32 else CastTeacher(pipe.transformer, dtype)

    @property
    def sharded(self) -> bool:
        """True when the models are sharded with FSDP2 as they are made (a ``fsdp`` sharding)."""
        return getattr(self.sharding, "kind", None) == "fsdp"

    def _sharded_models(self, gradient_checkpointing: bool) -> None:
        """Student and fake sharded and filled from process 0's whole teacher; the teacher is that
        whole model on process 0 (cast to ``teacher_dtype`` after the copies) and a meta placeholder
        on the others, until :meth:`shard_teacher`."""
        whole = self.pipe.transformer
        full = whole.state_dict() if whole is not None else None
        trained = []
        for name in ("student", "fake"):
            model = empty_transformer(self.transformer_config)
            if gradient_checkpointing:
                model.enable_gradient_checkpointing()
            # the fake's own parameters are sharded with the critic that will hold it
            trained.append(self.sharding.materialise(model, full, root=name == "student"))
        self.student, self.fake = trained
        del full
        inner = whole if whole is not None else empty_transformer(self.transformer_config)
        dtype = DTYPES[self.teacher_dtype]
        self.teacher = inner if dtype == torch.float32 else CastTeacher(inner, dtype)
        self._teacher_whole = True

    def shard_teacher(self, sharding) -> None:
        """Shard the frozen teacher with ``sharding``. Models made with a ``fsdp`` sharding: process
        0's whole teacher (in ``teacher_dtype``) is broadcast tensor by tensor into a sharded model
        built on the meta device, which becomes ``teacher`` and ``pipe.transformer`` on every
        process, and process 0 drops the whole one. Otherwise ``sharding.shard`` (in place under
        FSDP2, where every process loaded the teacher whole; nothing with ``ddp``)."""
        if not self._teacher_whole:
            sharding.shard(self.teacher, trainable=False)
            return
        dtype = DTYPES[self.teacher_dtype]
        inner = self.teacher.inner if isinstance(self.teacher, CastTeacher) else self.teacher
        full = inner.state_dict() if self.pipe.transformer is not None else None
        empty = empty_transformer(self.transformer_config)
        if dtype != torch.float32:
            empty = empty.to(dtype)
        sharded = freeze(self.sharding.materialise(empty, full, trainable=False))
        del full, inner
        self.pipe.transformer = sharded
        self.teacher = sharded if dtype == torch.float32 else CastTeacher(sharded, dtype)
        self._teacher_whole = False

    def _lora_models(self, teacher_dtype: str, gradient_checkpointing: bool) -> None:
        base = self.pipe.transformer.to(DTYPES[teacher_dtype])
        self._add_adapters(["student", "fake"])
        if gradient_checkpointing:
            base.enable_gradient_checkpointing()
        self.student = AdapterView(base, "student").train()
        self.fake = AdapterView(base, "fake").train()
        self.teacher = AdapterView(base, None)

    def _add_adapters(self, names: list[str]) -> None:
        """Add adapters ``names`` (fp32) to the shared base; every adapter stays trainable. Their random
        ``A`` matrices are drawn from a generator seeded by ``lora_seed`` and the number of adapters
        already there, so two runs of one config start from the same adapters."""
        lo, base = self.lora, self.pipe.transformer
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.lora_seed * 1_000_003 + len(getattr(base, "peft_config", {})))
            add_adapters(base, names, rank=lo.rank, alpha=lo.alpha, targets=lo.targets)
        for name in base.peft_config:
            for p in adapter_parameters(base, name):
                p.data = p.data.float()
                p.requires_grad_(True)

    @property
    def is_lora(self) -> bool:
        return self.lora is not None

    def branch_model(self, b: int, copy=trainable_copy) -> torch.nn.Module:
        """Split branch ``b``'s trainable model: ``copy(student)``, or in LoRA mode a fresh adapter
        ``branch<b>`` on the shared base (its weights are set when stage 2 starts)."""
        if not self.is_lora:
            return copy(self.student)
        self._add_adapters([f"branch{b}"])
        return AdapterView(self.pipe.transformer, f"branch{b}").train()

    def plain(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` as a stock diffusers transformer on the CPU: itself in full mode; in LoRA mode the
        base with ``model``'s adapter folded in (:func:`~sd35flash.models.lora.fused_copy`)."""
        if not self.is_lora:
            return model
        return fused_copy(self.pipe.transformer, model.name).to("cpu", torch.float32)

    def adapter_files(self, model: torch.nn.Module, tmp: str) -> dict[str, bytes]:
        """In LoRA mode, ``model``'s adapter alone as ``{file name: bytes}`` in the layout
        ``StableDiffusion3Pipeline.load_lora_weights`` reads; empty in full mode."""
        if not self.is_lora:
            return {}
        from pathlib import Path

        folder = save_adapter(self.pipe.transformer, model.name, Path(tmp))
        return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}

    @classmethod
    def for_config(cls, cfg, teacher: str, revision: str | None = None, encoders: bool = True,
                   sharding=None) -> DistillModels:
        """The models of distill config ``cfg`` (a :class:`~.config.DistillConfig`): its ``memory``
        options and ``resolution``, and in ``mode: lora`` its ``lora`` settings seeded by
        ``runtime.seed``. ``encoders=False`` never loads the text encoders; ``sharding``: see :meth:`load`."""
        mem = cfg.memory
        return cls.load(teacher, revision, mem.teacher_dtype, mem.gradient_checkpointing,
                        lora=cfg.lora if cfg.mode == "lora" else None, lora_seed=cfg.runtime.seed,
                        resolution=cfg.resolution, encoders=encoders, sharding=sharding)

    @classmethod
    def load(cls, teacher: str, revision: str | None = None, teacher_dtype: str = "fp32",
             gradient_checkpointing: bool = False, lora: LoraSettings | None = None,
             lora_seed: int = 0, resolution: int | None = None, encoders: bool = True,
             sharding=None) -> DistillModels:
        """Load the teacher pipeline (local folder or hub id; one-line errors from ``load_pipeline``);
        ``encoders=False`` leaves the text encoders out (tokenizers, VAE and transformer are loaded).
        With a ``fsdp`` ``sharding`` only process 0 loads (and verifies) the transformer's weights;
        the others read its config alone."""
        skip = {} if encoders else {name: None for name in ENCODERS}
        config = None
        if getattr(sharding, "kind", None) == "fsdp" and not sharding.acc.is_main_process:
            skip["transformer"] = None
            config = SD3Transformer2DModel.load_config(teacher, subfolder="transformer", revision=revision)
        pipe = load_pipeline(teacher, revision=revision, verify=config is None, **skip)
        return cls(pipe, teacher_dtype, gradient_checkpointing, lora, lora_seed, resolution, sharding, config)

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
        """(channels, side, side) of a training latent at the run's resolution."""
        return (int(self.teacher.config.in_channels), self.side, self.side)
