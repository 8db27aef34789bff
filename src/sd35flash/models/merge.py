"""Merging split-timestep branches back into one transformer by weight interpolation (METHOD.md, Stage 2).

``W = sum_b w_b W_b`` with ``w_b >= 0`` and ``sum_b w_b = 1``, on every floating-point tensor of the
branches' state dicts (non-floating tensors must agree across branches and are copied). With two
branches the weights come from one ratio ``r`` in [0, 1]: ``W = (1 - r) W_0 + r W_1``, so ``r = 0``
reproduces branch 0 (the noisy range, ``t`` in (0.5, 1] by default) exactly, ``r = 1`` reproduces
branch 1 (``t`` in (0, 0.5]) exactly, and ``r = 0.5`` is their mean. The paper merges "in a 3:7
ratio" without saying which branch gets 0.3; ``sd35flash merge-sweep`` chooses ``r`` on ``val``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import UserError
from .branches import load_transformer
from .pipeline_io import load_pipeline
from .student_info import read_student_info


def ratio_weights(ratio: float) -> list[float]:
    """``[1 - r, r]``: the two-branch merge weights of ratio ``r`` (UserError outside [0, 1])."""
    r = float(ratio)
    if not math.isfinite(r) or not 0.0 <= r <= 1.0:
        raise UserError(f"merge ratio {ratio} is outside [0, 1]; 0 gives branch 0, 1 gives branch 1")
    return [1.0 - r, r]


def check_weights(weights: Sequence[float], k: int) -> list[float]:
    w = [float(x) for x in weights]
    if len(w) != k or any(not math.isfinite(x) or x < 0 for x in w) or abs(sum(w) - 1.0) > 1e-6:
        raise UserError(f"merge weights must be {k} numbers >= 0 summing to 1, got {list(weights)}")
    return w


def merge_state_dicts(states: Sequence[Mapping[str, torch.Tensor]],
                      weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``W = sum_b w_b W_b`` per floating tensor (accumulated in float32 or wider, then cast back)."""
    w = check_weights(weights, len(states))
    keys = list(states[0])
    if any(list(s) != keys for s in states[1:]):
        raise UserError("the branches do not share one architecture (state dict keys differ)")
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        ts = [s[k] for s in states]
        if not ts[0].is_floating_point():
            if any(not torch.equal(ts[0], t) for t in ts[1:]):
                raise UserError(f"non-floating tensor {k} differs between branches; they cannot be merged")
            out[k] = ts[0].clone()
            continue
        acc_dtype = torch.promote_types(ts[0].dtype, torch.float32)
        acc = torch.zeros_like(ts[0], dtype=acc_dtype)
        for wb, t in zip(w, ts):
            acc += wb * t.to(acc_dtype)
        out[k] = acc.to(ts[0].dtype)
    return out


def merged_transformer(branches: Sequence[torch.nn.Module], weights: Sequence[float]) -> torch.nn.Module:
    """A new module (a copy of branch 0's architecture) holding the merged weights."""
    merged = copy.deepcopy(branches[0])
    merged.load_state_dict(merge_state_dicts([b.state_dict() for b in branches], weights))
    return merged


def load_branches(student: str | Path, like: torch.nn.Module) -> list[torch.nn.Module]:
    info = read_student_info(student)
    if info is None or info.split is None:
        raise UserError(f"{student} has no split-timestep branches to merge (distil with split.steps > 0)")
    return [load_transformer(student, b.subfolder, like) for b in info.split.branches]


def write_merged(student: str | Path, out: str | Path, weights: Sequence[float], unmerged: bool | None = None,
                 note: dict | None = None) -> Path:
    """Write a student folder at ``out`` whose ``transformer/`` merges ``student``'s branches with
    ``weights``; the branches (and the pre-split student) are kept, ``sd35flash.json`` records the new
    weights, and ``unmerged`` (when given) sets the folder's default sampling mode."""
    from .student_folder import export_student

    pipe = load_pipeline(student)
    info = read_student_info(student)
    branches = load_branches(student, pipe.transformer)
    w = check_weights(weights, len(branches))
    extras = {b.subfolder: m for b, m in zip(info.split.branches, branches)}
    if info.split.presplit:
        extras[info.split.presplit] = load_transformer(student, info.split.presplit, pipe.transformer)
    split = replace(info.split, merge_weights=w, unmerged=info.split.unmerged if unmerged is None else unmerged)
    extra = dict(info.extra)
    if note:
        extra["merge"] = note
    new = replace(info, split=split, extra=extra)
    return export_student(pipe, merged_transformer(branches, w), out, new, extra_transformers=extras)
