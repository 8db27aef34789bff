"""Prompt sources for distillation: the shapes world, or a user's text / JSONL prompt file.

Distillation is prompt-only (DMD needs no images). The shapes source also carries the scene specs,
so the GAN's real side can use renders and probes can be judged.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..world import SceneSpec, paraphrase, split_specs


@dataclass
class PromptSource:
    """A fixed, ordered list of training prompts; ``specs[i]`` is the scene of ``prompts[i]`` when known."""

    name: str
    prompts: list[str]
    specs: list[SceneSpec] | None = None

    def __len__(self) -> int:
        return len(self.prompts)


def shapes_prompts(n: int, seed: int = 0) -> PromptSource:
    """``n`` shapes-world ``train`` specs, each with one paraphrase fixed by ``seed`` and its index."""
    specs = split_specs("train", n, seed=seed + 31)
    prompts = [paraphrase(s, random.Random(seed * 1_000_003 + i)) for i, s in enumerate(specs)]
    return PromptSource("shapes", prompts, specs)


def file_prompts(path: str | Path) -> PromptSource:
    """Prompts from a file: ``.jsonl`` holds ``{"prompt": ...}`` objects, anything else one prompt a line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file {p} does not exist; pass --prompts shapes or a text/JSONL file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"prompt file {p} is not UTF-8 text; write one prompt per line") from None
    prompts: list[str] = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            prompts.append(_jsonl_prompt(line, p, no))
        else:
            prompts.append(line.strip())
    if not prompts:
        raise UserError(f"prompt file {p} holds no prompts; write one prompt per line (or {{\"prompt\": ...}} lines)")
    return PromptSource(p.name, prompts)


def _jsonl_prompt(line: str, path: Path, no: int) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise UserError(f"{path}:{no} is not valid JSON; write one {{\"prompt\": \"...\"}} object per line") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise UserError(f"{path}:{no} needs a non-empty string field \"prompt\"")
    return obj["prompt"].strip()


def load_prompts(source: str, n: int, seed: int = 0) -> PromptSource:
    """``shapes`` -> :func:`shapes_prompts` (``n`` scenes); anything else is a prompt file path."""
    if source == "shapes":
        return shapes_prompts(n, seed)
    return file_prompts(source)
