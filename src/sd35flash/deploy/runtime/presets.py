"""Device presets: named deployment recipes for an SD3 pipeline folder.

A preset fixes how a model is run, not which model: the precision of the unquantized parts, the
transformer quantization (with an optional mixed-precision error budget), T5 on / off / int8, what
happens to the text encoders after encoding, a resolution cap and the backend. The paper ships
"16-bit with T5" and "8-bit without T5" variants and a 6-bit mobile one (``docs/METHOD.md``,
"Deployment"); the presets below are those recipes plus an fp32 reference, an fp8 GPU
recipe and an onnxruntime CPU recipe.

Hardware rules (:func:`unsupported_reason`): fp8 needs a CUDA GPU of compute capability >= 8.9;
fp16 needs a GPU (diffusers refuses fp16 pipelines on the CPU); bf16 runs everywhere (on CPUs
without native bf16 it is several times slower than fp32, but it measures memory faithfully);
the onnx backend runs on the CPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from ...errors import UserError
from .quantize import METHODS
from .quantize import unsupported_reason as quant_unsupported_reason

__all__ = ["PRESETS", "Preset", "check_runnable", "get_preset", "presets_table", "runnable_presets"]

Precision = Literal["fp32", "bf16", "fp16"]
T5Mode = Literal["fp", "int8", "off"]
Backend = Literal["torch", "onnx"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Preset:
    """One deployment recipe.

    ``precision``: dtype of every unquantized weight and of the activations. ``quantization``: a
    :data:`sd35flash.deploy.runtime.quantize.METHODS` name for the transformer's Linear layers.
    ``error_budget``: when set, a sensitivity scan keeps the most sensitive layers in ``precision``
    until the transformer's relative output error is within it. ``t5``: ``fp`` (in ``precision``),
    ``int8`` (int8 weight-only) or ``off`` (zeros; never loaded). ``free_encoders``: drop the text
    encoders once the job's prompts are encoded. ``embed_cache``: reuse prompt embeddings from disk.
    ``max_resolution``: cap on the image side (the model's native side when smaller).
    ``backend``: ``torch`` or ``onnx`` (onnxruntime, int8 dynamic quantization).
    """

    name: str
    summary: str
    precision: Precision = "fp32"
    quantization: str = "none"
    error_budget: float | None = None
    t5: T5Mode = "fp"
    free_encoders: bool = False
    embed_cache: bool = True
    max_resolution: int | None = None
    backend: Backend = "torch"

    def __post_init__(self) -> None:
        if self.quantization not in METHODS:
            raise ValueError(f"preset {self.name}: unknown quantization {self.quantization}")

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def use_t5(self) -> bool:
        return self.t5 != "off"

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("reference-fp32", "fp32 everywhere, T5 on: the reference and the PyTorch fp32 CPU path",
           precision="fp32"),
    Preset("desktop-16bit-t5", "paper's 16-bit variant with T5: bf16 weights, T5 in bf16, encoders resident",
           precision="bf16"),
    Preset("desktop-8bit-t5int8", "bf16 + int8 dynamic transformer, T5 in int8, encoders freed after encoding",
           precision="bf16", quantization="int8-dynamic", t5="int8", free_encoders=True),
    Preset("laptop-8bit-no-t5", "paper's 8-bit variant without T5: int8 weight-only transformer, bf16 rest, "
           "CLIP freed after encoding", precision="bf16", quantization="int8-weight", t5="off", free_encoders=True),
    Preset("mobile-6bit-no-t5", "paper's mobile variant: int6 weights (sensitive layers kept in bf16 to a 3% "
           "output-error budget), no T5, encoders freed, at most 512 px", precision="bf16",
           quantization="int6-weight", error_budget=0.03, t5="off", free_encoders=True, max_resolution=512),
    Preset("gpu-fp8-no-t5", "fp8 transformer (Ada/Hopper GPUs), bf16 rest, no T5, encoders freed",
           precision="bf16", quantization="fp8", t5="off", free_encoders=True),
    Preset("cpu-onnx-int8", "onnxruntime on the CPU with int8 dynamic quantization; same recipe as "
           "reference-fp32 otherwise", precision="fp32", t5="fp", backend="onnx"),
)}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is a one-line error listing the valid ones."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def unsupported_reason(preset: Preset, device: torch.device | str) -> str | None:
    """Why ``preset`` cannot run on ``device``, or ``None``."""
    dev = torch.device(device)
    if preset.precision == "fp16" and dev.type == "cpu":
        return "fp16 needs a GPU"
    if preset.backend == "onnx":
        if dev.type != "cpu":
            return "the onnx backend runs on the CPU"
        if importlib.util.find_spec("sd35flash.deploy.export.onnx_runtime") is None:
            return "the onnx backend is not installed in this build"
    return quant_unsupported_reason(preset.quantization, dev)


def runnable_presets(device: torch.device | str) -> list[str]:
    return [n for n, p in PRESETS.items() if unsupported_reason(p, device) is None]


def check_runnable(preset: Preset, device: torch.device | str) -> None:
    """One-line error when ``preset`` cannot run on ``device``, naming the presets that can."""
    reason = unsupported_reason(preset, device)
    if reason is not None:
        raise UserError(f"preset {preset.name} cannot run on {torch.device(device).type}: {reason}; "
                        f"presets that can run here: {', '.join(runnable_presets(device))}")


def presets_table(device: torch.device | str | None = None) -> str:
    """A plain-text table of every preset (and whether it runs on ``device``)."""
    rows = [("name", "precision", "transformer", "T5", "encoders", "max px", "backend", "runs here", "summary")]
    for p in PRESETS.values():
        quant = p.quantization + (f" (budget {p.error_budget:g})" if p.error_budget is not None else "")
        runs = "" if device is None else ("yes" if unsupported_reason(p, device) is None else "no")
        rows.append((p.name, p.precision, quant, p.t5, "freed" if p.free_encoders else "resident",
                     str(p.max_resolution or "native"), p.backend, runs, p.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 7)
    return "\n".join(lines)
