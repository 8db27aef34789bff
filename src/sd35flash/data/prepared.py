"""Open a folder written by ``sd35flash prepare`` for training: its prompts, embedding store and
(if built) teacher trajectories, checked against the live teacher.

Distillation plugs it in where it would otherwise encode prompts live::

    prepared = open_prepared(folder, fingerprint=encoder_fingerprint(pipe, use_t5=True))
    conditioner = prepared.conditioner(torch.float32)   # full / for_student / uncond, as distill's Conditioner
    source = prepared.prompts()                          # the PromptSource prepare encoded
    bank = prepared.trajectories                         # prompts / states / schedule, as a TrajectoryBank

after which the text encoders can be freed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..text.store import EmbeddingStore, StoredConditioner
from .prompts import PromptSource, file_prompts
from .trajectories import TrajectoryStore

__all__ = ["MANIFEST", "Prepared", "open_prepared"]

#: The settings file of a prepare folder.
MANIFEST = "prepare.json"


@dataclass
class Prepared:
    folder: Path
    settings: dict
    store: EmbeddingStore
    trajectories: TrajectoryStore | None

    def conditioner(self, dtype: torch.dtype = torch.float32) -> StoredConditioner:
        return StoredConditioner(self.store, dtype)

    def prompts(self) -> PromptSource:
        return file_prompts(self.folder)


def open_prepared(folder: str | Path, fingerprint: str | None = None,
                  trajectory_settings: dict | None = None) -> Prepared:
    """Read a prepare folder. ``fingerprint`` (the live encoders') must match the store's; with
    ``trajectory_settings`` (what distillation would build) the folder must hold trajectories built
    with exactly those settings."""
    folder = Path(folder).expanduser()
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not a prepare folder (no {MANIFEST}); run `sd35flash prepare --out {folder}`")
    settings = json.loads(path.read_text(encoding="utf-8"))
    store = EmbeddingStore(folder / "embeds", fingerprint=fingerprint)
    trajectories = None
    if trajectory_settings is not None:
        if settings.get("trajectories") is None:
            raise UserError(f"{folder} holds no teacher trajectories; run `sd35flash prepare ... --trajectories` "
                            "with this recipe")
        trajectories = TrajectoryStore(folder / "trajectories", settings=trajectory_settings)
    elif settings.get("trajectories") is not None and (folder / "trajectories").is_dir():
        trajectories = TrajectoryStore(folder / "trajectories")
    return Prepared(folder, settings, store, trajectories)
