"""Accelerate set-up from config: device, precision and processes are never assumed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from ..errors import ConfigError


@dataclass
class RuntimeConfig:
    """Where and how a job runs.

    device: ``auto`` picks CUDA when present, else CPU. Under ``torchrun`` on CPU, accelerate needs
    ``cpu=True``, which ``device: cpu`` (or ``auto`` without CUDA) sets.
    mixed_precision: ``auto``, ``no``, ``bf16`` or ``fp16`` (autocast; weights stay fp32). ``auto``
    is bf16 on CUDA and ``no`` on CPU: on CPUs without native bf16 (AVX2-only, like our 2-core
    machines) bf16 autocast is about 8x slower than fp32.
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 0
    num_threads: int = 0  # 0 = torch default

    def validate(self) -> None:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("runtime.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")


def use_cpu(cfg: RuntimeConfig) -> bool:
    return cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())


def make_accelerator(cfg: RuntimeConfig, project_dir: str | Path, log_with: str | None = "tensorboard") -> Accelerator:
    """Build the :class:`Accelerator` for a run and seed every RNG (differently on every process)."""
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    cpu = use_cpu(cfg)
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "no" if cpu else "bf16"
    if mp == "fp16" and cpu:
        mp = "bf16"  # fp16 autocast is not useful on CPU
    acc = Accelerator(
        cpu=cpu,
        mixed_precision=mp,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(Path(project_dir) / "tb")),
    )
    set_seed(cfg.seed, device_specific=True)
    return acc


def world_info() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment, before an Accelerator exists."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
