"""Save a student as a stock SD3 pipeline folder plus ``sd35flash.json``.

The folder holds the teacher's VAE, text encoders, tokenizers and scheduler with the student's
(EMA) transformer, so ``StableDiffusion3Pipeline.from_pretrained`` loads it, and
``sd35flash.json`` records the schedule (without the final 0), the step count, guidance 1.0 and the
provenance; ``sd35flash eval`` / ``generate`` read the schedule from it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline

from ..models.pipeline_io import save_pipeline
from ..models.student_info import FILENAME, StudentInfo, info_to_json
from ..paths import git_commit


def student_info(schedule: list[float], teacher: str, recipe: str, needs_t5: bool,
                 extra: dict[str, Any] | None = None) -> StudentInfo:
    """The ``sd35flash.json`` record: ``timesteps`` = the K student times, guidance 1.0."""
    info = StudentInfo(timesteps=[float(t) for t in schedule], steps=len(schedule), guidance=1.0,
                       needs_t5=needs_t5, teacher=teacher, recipe=recipe, commit=git_commit(), extra=extra or {})
    info.validate()
    return info


def export_student(pipe: StableDiffusion3Pipeline, transformer: torch.nn.Module, out: str | Path,
                   info: StudentInfo) -> Path:
    """Write ``out`` atomically: ``pipe``'s other components + a copy of ``transformer`` + ``sd35flash.json``."""
    student = copy.deepcopy(transformer).to("cpu").eval()
    student.requires_grad_(False)
    components = dict(pipe.components)
    components["transformer"] = student
    folder = StableDiffusion3Pipeline(**components)
    return save_pipeline(folder, out, extra_files={FILENAME: info_to_json(info)})
