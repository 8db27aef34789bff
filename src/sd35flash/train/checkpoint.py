"""Atomic checkpoints with exact resume, on top of ``Accelerator.save_state``.

A checkpoint is a folder ``ckpt-<step>`` holding every prepared model and optimiser, the LR
scheduler, every process's RNG states and each object registered with
``accelerator.register_for_checkpointing`` (EMA, data position). It is written to
``ckpt-<step>.tmp`` and renamed only when complete, so a crash never leaves a half checkpoint that
a resume would pick up.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

PREFIX = "ckpt-"


def read_meta(path: str | Path) -> dict:
    """The ``meta.json`` of checkpoint ``path`` (its step and whatever the trainer added)."""
    return json.loads((Path(path) / "meta.json").read_text())


def saved_models(path: str | Path) -> int:
    """How many prepared models ``Accelerator.save_state`` wrote into checkpoint ``path``."""
    pattern = re.compile(r"(model|pytorch_model)(_\d+)?\.(safetensors|bin)")
    return sum(1 for p in Path(path).iterdir() if pattern.fullmatch(p.name))


class StopTraining(Exception):
    """Raised after a checkpoint when a run was asked to stop early (``stop_at``); resume continues it."""


class CheckpointManager:
    """Saves, finds and loads checkpoints in ``root``; keeps the ``keep`` newest."""

    def __init__(self, root: str | Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp")]
        done = [p for p in done if (p / "meta.json").is_file()]
        return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))

    def latest(self) -> Path | None:
        ckpts = self.all()
        return ckpts[-1] if ckpts else None

    def save(self, accelerator: Accelerator, step: int, meta: dict | None = None) -> Path:
        """Write ``ckpt-<step>`` atomically on every process's behalf (main process renames)."""
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f"{PREFIX}{step:08d}.tmp"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "meta.json").write_text(json.dumps({"step": step, **(meta or {})}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.all()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def load(self, accelerator: Accelerator, path: Path | None = None) -> int:
        """Restore the state saved at ``path`` (default: the newest) and return its step (0 if none)."""
        path = path or self.latest()
        if path is None:
            return 0
        accelerator.load_state(str(path))
        return int(read_meta(path)["step"])
