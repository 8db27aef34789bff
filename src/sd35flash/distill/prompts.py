"""Prompt sources for distillation: re-exported from :mod:`sd35flash.data.prompts` (the shapes world,
or a ``.txt`` / ``.jsonl`` / ``.parquet`` prompt file, or a ``sd35flash prepare`` folder)."""

from ..data.prompts import PromptSource, file_prompts, load_prompts, shapes_prompts

__all__ = ["PromptSource", "file_prompts", "load_prompts", "shapes_prompts"]
