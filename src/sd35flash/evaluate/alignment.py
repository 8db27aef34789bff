"""Prompt alignment, GenEval-style: the shapes-world judge per image, aggregated per category."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..world import CATEGORIES, judge
from ..world.judge import Verdict
from ..world.spec import SceneSpec


def judge_all(images: np.ndarray | Sequence[np.ndarray], specs: Sequence[SceneSpec]) -> list[Verdict]:
    return [judge(np.asarray(im), s) for im, s in zip(images, specs)]


def alignment_scores(verdicts: Sequence[Verdict], specs: Sequence[SceneSpec]) -> dict[str, float]:
    """``alignment.<category>`` = fraction of that category's images judged fully correct;
    ``overall`` = the mean over the categories present (GenEval's overall score);
    ``colors`` = fraction of all images whose colours are all present (the colour check rides on
    every category)."""
    out: dict[str, float] = {}
    for c in CATEGORIES:
        sel = [v.correct for v, s in zip(verdicts, specs) if s.category == c]
        if sel:
            out[c] = float(np.mean(sel))
    out["overall"] = float(np.mean([out[c] for c in CATEGORIES if c in out])) if out else 0.0
    out["colors"] = float(np.mean([v.checks.get("colors", False) for v in verdicts])) if verdicts else 0.0
    return out
