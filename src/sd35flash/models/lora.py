"""LoRA adapters on one frozen SD3 transformer (peft through diffusers' ``PeftAdapterMixin``).

One base transformer carries several named adapters (student, fake, split branches). Which one runs
is chosen per forward (:func:`use_adapter`): a name runs base + that adapter, ``None`` runs the base
with every adapter disabled, which is exactly the base (the teacher). So one copy of the weights
serves teacher, student and fake; only the ``lora_`` parameters of the adapter in use take
gradients.

Export: :func:`fused_copy` is a plain transformer with one adapter folded into its weights (what
stock diffusers loads), :func:`save_adapter` writes the adapter alone in the layout
``StableDiffusion3Pipeline.load_lora_weights`` reads.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def add_adapters(transformer: torch.nn.Module, names: Sequence[str], rank: int = 16, alpha: float | None = None,
                 targets: Sequence[str] = TARGETS) -> torch.nn.Module:
    """Freeze ``transformer`` and add one LoRA adapter per name (rank ``rank``, scale ``alpha / rank``,
    ``alpha`` defaulting to ``rank``) on the attention projections ``targets``. A fresh adapter is
    the identity (its ``B`` is zero), so every adapter starts as the base."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    present = {n.rsplit(".", 1)[-1] for n, _ in transformer.named_modules()} | {
        ".".join(n.split(".")[-2:]) for n, _ in transformer.named_modules()}
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights=True,
                     target_modules=[t for t in targets if t in present])
    for name in names:
        transformer.add_adapter(copy.deepcopy(cfg), adapter_name=name)
    for name in names:  # every adapter trainable; use_adapter picks the one a forward uses
        for p in adapter_parameters(transformer, name):
            p.requires_grad_(True)
    return transformer


def adapter_parameters(transformer: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """The ``lora_A`` / ``lora_B`` parameters of adapter ``name``."""
    return [p for n, p in transformer.named_parameters() if ".lora_" in n and n.split(".")[-2] == name]


def _lora_layers(transformer: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    return [m for m in transformer.modules() if isinstance(m, LoraLayer)]


@contextmanager
def use_adapter(transformer: torch.nn.Module, name: str | None) -> Iterator[None]:
    """Inside the block, ``transformer`` runs with adapter ``name`` only (``None``: no adapter, the
    base). The trainable flags of the adapters are left alone (peft's ``set_adapter`` would change
    them); the previous choice is restored afterwards."""
    layers = _lora_layers(transformer)
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    try:
        for m in layers:
            if name is None:
                m._disable_adapters = True
            else:
                m._disable_adapters = False
                m._active_adapter = [name]
        yield
    finally:
        for m, (active, disabled) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, disabled


class AdapterView(torch.nn.Module):
    """``transformer`` as the model of one adapter (``None``: the base): calling it runs the shared
    transformer inside :func:`use_adapter`. Its parameters are the adapter's ``lora_`` parameters
    (the same objects the shared transformer holds; none for ``None``), so an optimiser, an EMA or a
    checkpoint of the view covers the adapter alone. ``config``, ``device``,
    ``transformer_blocks`` and ``gradient_checkpointing`` are the transformer's.

    A base held in 16-bit (``dtype``) gets its floating inputs cast to that dtype (the timestep stays
    fp32) and returns the velocity in fp32, like :class:`~sd35flash.distill.models.CastTeacher`."""

    def __init__(self, transformer: torch.nn.Module, name: str | None) -> None:
        super().__init__()
        self._base = (transformer,)  # a tuple keeps the shared base out of this module's tree
        self.name = name
        self.adapter = torch.nn.ParameterList(adapter_parameters(transformer, name) if name is not None else [])

    @property
    def base(self) -> torch.nn.Module:
        return self._base[0]

    @property
    def config(self):
        return self.base.config

    @property
    def dtype(self) -> torch.dtype:
        """fp32: what the view takes and returns, whatever the base is held in."""
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def transformer_blocks(self) -> torch.nn.ModuleList:
        return self.base.transformer_blocks

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(getattr(self.base, "gradient_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.base.gradient_checkpointing = on

    def forward(self, *args, **kwargs):
        dtype = self.base.dtype
        if dtype != torch.float32:
            kwargs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v
                      for k, v in kwargs.items()}
        with use_adapter(self.base, self.name):
            out = self.base(*args, **kwargs)
        if dtype != torch.float32 and isinstance(out, tuple):
            return (out[0].float(), *out[1:])
        return out


def fused_copy(transformer: torch.nn.Module, name: str) -> torch.nn.Module:
    """A plain transformer (no peft layers) whose weights are the base with adapter ``name`` folded
    in: ``W = W_base + (alpha / r) B A``."""
    twin = copy.deepcopy(transformer)
    for other in [a for a in twin.peft_config if a != name]:
        twin.delete_adapters(other)
    twin.fuse_lora(lora_scale=1.0, adapter_names=[name])
    twin.unload_lora()
    return twin.requires_grad_(False)


def save_adapter(transformer: torch.nn.Module, name: str, folder: str | Path) -> Path:
    """Write adapter ``name`` alone to ``folder`` (``pytorch_lora_weights.safetensors``), loadable by
    ``StableDiffusion3Pipeline.load_lora_weights(folder)`` on a pipeline of the base."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    layers = get_peft_model_state_dict(transformer, adapter_name=name)
    StableDiffusion3Pipeline.save_lora_weights(str(folder), transformer_lora_layers=layers)
    return folder
