"""Save a student as a stock SD3 pipeline folder plus ``sd35flash.json``.

The folder holds the teacher's VAE, text encoders, tokenizers and scheduler with the student's
(EMA) transformer, so ``StableDiffusion3Pipeline.from_pretrained`` loads it, and
``sd35flash.json`` records the schedule (without the final 0), the step count, guidance 1.0 and the
provenance; ``sd35flash eval`` / ``generate`` read the schedule from it. A split-timestep student
also keeps its branches (``transformer_branch<b>/``) and, optionally, the pre-split student
(``transformer_presplit/``) as extra subfolders, listed in ``sd35flash.json`` under ``split``;
``transformer/`` is their merge. A student distilled in LoRA mode (``mode: lora``) has its adapter
folded into ``transformer/`` and also keeps it alone in ``student_lora/``
(``pytorch_lora_weights.safetensors``): ``StableDiffusion3Pipeline.from_pretrained(teacher)`` then
``pipe.load_lora_weights(folder / "student_lora")`` is the student (with stage 2, the pre-split one).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline

from ..paths import git_commit
from .pipeline_io import save_pipeline
from .student_info import FILENAME, SplitInfo, StudentInfo, info_to_json


def student_info(schedule: list[float], teacher: str, recipe: str, needs_t5: bool,
                 extra: dict[str, Any] | None = None, split: SplitInfo | None = None) -> StudentInfo:
    """The ``sd35flash.json`` record: ``timesteps`` = the K student times, guidance 1.0."""
    info = StudentInfo(timesteps=[float(t) for t in schedule], steps=len(schedule), guidance=1.0,
                       needs_t5=needs_t5, teacher=teacher, recipe=recipe, commit=git_commit(), extra=extra or {},
                       split=split)
    info.validate()
    return info


def _cpu_copy(module: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(module).to("cpu").eval()
    twin.requires_grad_(False)
    return twin


def export_student(pipe: StableDiffusion3Pipeline, transformer: torch.nn.Module, out: str | Path,
                   info: StudentInfo, extra_transformers: dict[str, torch.nn.Module] | None = None,
                   extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``out`` atomically: ``pipe``'s other components + a copy of ``transformer`` + ``sd35flash.json``
    (+ ``extra_transformers`` as subfolders: split-timestep branches, the pre-split student; +
    ``extra_files`` by relative path: a LoRA student's adapter in ``student_lora/``)."""
    components = dict(pipe.components)
    components["transformer"] = _cpu_copy(transformer)
    folder = StableDiffusion3Pipeline(**components)
    extras = {name: _cpu_copy(m) for name, m in (extra_transformers or {}).items()}
    return save_pipeline(folder, out, extra_files={FILENAME: info_to_json(info), **(extra_files or {})},
                         extra_models=extras)
