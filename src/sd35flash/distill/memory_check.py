"""Refuse a distillation that the training-memory planner says will not fit, before loading anything.

``check_distill_fits(cfg, teacher)`` (called by ``distill`` unless ``--force``) turns the config and
the teacher's architecture into a :class:`~sd35flash.plan.train.TrainSetup`, plans it
(``plan/train.py``) and compares the per-device peak with the memory of one visible device:
a CUDA device's total memory, or on the CPU the available RAM shared by the processes of this node.
When it does not fit, the one-line error names the cheapest change that does, trying in order
``--ema cpu``, ``--optimizer adamw8bit``, ``--gradient-checkpointing``, ``--sharding fsdp`` (full mode on
more than one process), ``--mode lora`` (each alone, then together) and more GPUs under FSDP2.

``SD35FLASH_DEVICE_MEMORY_GIB`` overrides the device memory (tests; a GPU shared with another job).
Options the config does not have are taken at what ``distill/trainer.py`` does without them: full
fine-tuning, DDP (``sharding: fsdp`` is planned as FSDP2), an fp32 teacher, text encoders resident,
EMA on the device, every optimiser kept.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..plan.architecture import Architecture, load_architecture
from ..plan.train import TrainSetup, plan_training

__all__ = ["available_gib", "check_distill_fits", "check_training_fits", "cheapest_fit", "setup_for_distill"]

MEMORY_ENV = "SD35FLASH_DEVICE_MEMORY_GIB"
HEADROOM_GIB = 1.0  # CUDA context / allocator / interpreter beyond the plan
HUB_ARCHITECTURES = {"stabilityai/stable-diffusion-3.5-medium": "sd35-medium",
                     "stabilityai/stable-diffusion-3.5-large": "sd35-large",
                     "stabilityai/stable-diffusion-3.5-large-turbo": "sd35-large"}


def available_gib(device: str | torch.device) -> float:
    """Memory of one device in GiB: ``$SD35FLASH_DEVICE_MEMORY_GIB`` when set, else a CUDA device's
    total memory, else the CPU's available RAM (``MemAvailable``) divided by the processes of this
    node (``LOCAL_WORLD_SIZE``)."""
    env = os.environ.get(MEMORY_ENV)
    if env:
        try:
            return float(env)
        except ValueError:
            raise UserError(f"{MEMORY_ENV}={env!r} must be a number of GiB") from None
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev.index or 0).total_memory / 2**30
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20 / local
    except (OSError, KeyError, ValueError):
        return float("inf")  # unknown: do not refuse


def _option(cfg: Any, name: str, default: Any) -> Any:
    """``cfg.<name>`` or ``cfg.memory.<name>`` when the config has it, else ``default``."""
    for holder in (cfg, getattr(cfg, "memory", None)):
        if holder is not None and hasattr(holder, name):
            return getattr(holder, name)
    return default


def _teacher_architecture(teacher: str) -> Architecture | None:
    path = Path(teacher).expanduser()
    if path.is_dir() and (path / "transformer" / "config.json").is_file():
        return load_architecture(path)
    if teacher in HUB_ARCHITECTURES:
        return load_architecture(HUB_ARCHITECTURES[teacher])
    return None  # a hub id we cannot read without downloading


def setup_for_distill(cfg: Any, arch: Architecture, world: int, device: str | torch.device) -> TrainSetup:
    """The :class:`TrainSetup` of distill config ``cfg`` with teacher architecture ``arch`` on ``world``
    processes of ``device``'s type."""
    on_cpu = torch.device(device).type == "cpu"
    mixed = getattr(getattr(cfg, "runtime", None), "mixed_precision", "auto")
    compute = "fp32" if on_cpu or mixed == "no" else ("fp16" if mixed == "fp16" else "bf16")
    tr = arch.configs["transformer"]
    vae_scale = 2 ** (len(arch.configs["vae"]["block_out_channels"]) - 1)
    gan = getattr(cfg, "gan", None)
    split = getattr(cfg, "split", None)

    def per(n) -> int:
        """ceil(global batch / processes)"""
        return max(1, -(-int(n) // world))

    return TrainSetup(
        config=arch.name, mode=_option(cfg, "mode", "full"), gpus=world, sharding=_option(cfg, "sharding", "ddp"),
        resolution=int(getattr(cfg, "resolution", 0) or 0) or int(tr["sample_size"]) * vae_scale,
        batch=per(cfg.batch_size),
        tg_batch=per(cfg.trajectory.batch_size) if cfg.trajectory.steps > 0 else None,
        gradient_checkpointing=bool(_option(cfg, "gradient_checkpointing", False)),
        optimizer=_option(cfg, "optimizer", "adamw"),
        teacher_dtype=_option(cfg, "teacher_dtype", "fp32"), compute_dtype=compute,
        ema="cpu" if _option(cfg, "ema_device", "accelerator") == "cpu" else "device",
        lora_rank=int(getattr(getattr(cfg, "lora", None), "rank", 64)),
        encoders="freed" if _option(cfg, "conditioning", "live") == "precompute" else "resident",
        gan=bool(gan.enabled) if gan is not None else True, gan_heads=len(gan.blocks) if gan is not None else 1,
        gan_head_channels=int(gan.head_channels) if gan is not None else 64,
        guidance=float(getattr(cfg, "guidance", 4.0)) > 1.0,
        free_finished_optimizers=bool(_option(cfg, "free_finished_optimizers", False)),
        split_branches=split.num_branches if split is not None and split.steps > 0 else 0,
        probe_batch=max(1, min(int(getattr(cfg, "probe_images", 1)), int(_option(cfg, "probe_batch", 32)))))


#: How each change is spelt: as a `plan --train` flag, and as the `distill` override that makes it.
_SPELLING = {"ema": ("--ema cpu", "--set memory.ema_device=cpu"),
             "optimizer": ("--optimizer adamw8bit", "--set memory.optimizer=adamw8bit"),
             "gc": ("--gradient-checkpointing", "--set memory.gradient_checkpointing=true")}


def _candidates(setup: TrainSetup, for_distill: bool = False) -> list[tuple[str, TrainSetup]]:
    """Changes that lower the plan, cheapest first: each alone, then accumulated. ``for_distill``
    spells them as ``distill`` options; the number of GPUs is then the launcher's (``torchrun --nproc_per_node``)."""
    say = (lambda k: _SPELLING[k][1]) if for_distill else (lambda k: _SPELLING[k][0])
    steps: list[tuple[str, dict[str, Any]]] = []
    if setup.ema == "device":
        steps.append((say("ema"), {"ema": "cpu"}))
    if setup.optimizer == "adamw":
        steps.append((say("optimizer"), {"optimizer": "adamw8bit"}))
    if not setup.gradient_checkpointing:
        steps.append((say("gc"), {"gradient_checkpointing": True}))
    if setup.mode == "full" and setup.gpus > 1 and setup.sharding_used != "fsdp":
        steps.append(("--sharding fsdp", {"sharding": "fsdp"}))
    if setup.mode == "full":
        steps.append(("--mode lora", {"mode": "lora", "sharding": "ddp"}))
    out = [(label, dataclasses.replace(setup, **change)) for label, change in steps]
    for n in range(2, len(steps) + 1):  # the first n together
        changes = {k: v for _, c in steps[:n] for k, v in c.items()}
        out.append((" ".join(label for label, _ in steps[:n]), dataclasses.replace(setup, **changes)))
    if setup.mode == "full":
        for gpus in (2, 4, 8, 16, 32, 64):
            if gpus > setup.gpus:
                label = (f"more GPUs: torchrun --nproc_per_node {gpus} ... --sharding fsdp" if for_distill
                         else f"more GPUs: --gpus {gpus} --sharding fsdp")
                out.append((label, dataclasses.replace(setup, gpus=gpus, sharding="fsdp")))
    return out


def cheapest_fit(setup: TrainSetup, budget_gib: float, arch: Architecture | None = None,
                 for_distill: bool = False) -> tuple[str, float] | None:
    """``(option, planned peak GiB)`` of the cheapest change that brings the plan under ``budget_gib``."""
    for label, candidate in _candidates(setup, for_distill):
        peak = plan_training(candidate, arch)["peak_gib"]
        if peak + HEADROOM_GIB <= budget_gib:
            return label, peak
    return None


def check_training_fits(setup: TrainSetup, budget_gib: float, where: str = "this device",
                        arch: Architecture | None = None, for_distill: bool = False) -> dict[str, Any]:
    """Raise :class:`UserError` (one line) when ``setup``'s planned peak plus 1 GiB of headroom exceeds
    ``budget_gib``; the message names the cheapest option that fits, or says none does. Returns the plan."""
    plan = plan_training(setup, arch)
    if plan["peak_gib"] + HEADROOM_GIB <= budget_gib:
        return plan
    fix = cheapest_fit(setup, budget_gib, arch, for_distill)
    if fix is not None:
        advice = f"{fix[0]} would fit ({fix[1]:.3g} GiB)"
    elif for_distill:
        advice = "none of distill's memory options fits; lower the batch size or the resolution"
    else:
        advice = "no single option fits; lower the batch size or the resolution"
    raise UserError(f"this distillation is planned at {plan['peak_gib']:.3g} GiB per device ({plan['peak_phase']}, "
                    f"`sd35flash plan --train`) + {HEADROOM_GIB:g} GiB headroom, more than the {budget_gib:.3g} GiB of "
                    f"{where}; {advice}, "
                    "or pass --force to run anyway")


def check_distill_fits(cfg: Any, teacher: str, device: str | torch.device | None = None,
                       world: int | None = None) -> dict[str, Any] | None:
    """The check ``distill`` runs before loading anything (see the module docstring); ``None`` when the
    teacher's architecture cannot be read without downloading it."""
    arch = _teacher_architecture(teacher)
    if arch is None:
        return None
    if device is None:
        from ..train.runtime import use_cpu

        device = "cpu" if use_cpu(cfg.runtime) else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    setup = setup_for_distill(cfg, arch, world, device)
    dev = torch.device(device)
    where = f"CUDA device {dev.index or 0}" if dev.type == "cuda" else "available CPU memory"
    return check_training_fits(setup, available_gib(device), where, arch, for_distill=True)
