"""The shapes world: a synthetic text-to-image world whose prompts have checkable meaning.

- :mod:`.vocab`: the fixed vocabulary, palette and held-out colour-shape pairs;
- :mod:`.spec`: scene specs and their JSON Lines format;
- :mod:`.prompts`: canonical prompts (evaluation) and paraphrases (training);
- :mod:`.generate`: random specs and the train/val/test/heldout splits;
- :mod:`.render`: the ground-truth renderer;
- :mod:`.judge`: the GenEval-style judge of an image against a spec;
- :mod:`.selftest`: how far the judge can be trusted.
"""

from sd35flash.world.generate import SPLITS, random_spec, split_specs
from sd35flash.world.judge import Detected, Verdict, detect, judge
from sd35flash.world.prompts import all_words, canonical_prompt, paraphrase
from sd35flash.world.render import Placed, render, render_with_layout
from sd35flash.world.spec import ObjectSpec, SceneSpec, read_jsonl, write_jsonl
from sd35flash.world.vocab import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    HELDOUT_PAIRS,
    IMAGE_SIZE,
    PALETTE,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
)

_SELFTEST_NAMES = ("degrade", "junk_image", "run_selftest")


def __getattr__(name: str):  # lazy, so that `python -m sd35flash.world.selftest` imports it once
    if name in _SELFTEST_NAMES:
        from sd35flash.world import selftest

        return getattr(selftest, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "COLORS",
    "HELDOUT_PAIRS",
    "IMAGE_SIZE",
    "PALETTE",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Detected",
    "ObjectSpec",
    "Placed",
    "SceneSpec",
    "Verdict",
    "all_words",
    "canonical_prompt",
    "degrade",
    "detect",
    "judge",
    "junk_image",
    "paraphrase",
    "random_spec",
    "read_jsonl",
    "render",
    "render_with_layout",
    "run_selftest",
    "split_specs",
    "write_jsonl",
]
