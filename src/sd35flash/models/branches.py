"""Split-timestep branches of a student folder: time ranges, per-step routing, loading, memory.

A student made with stage 2 (``distill`` with ``split.steps > 0``) keeps its branches as extra
transformer subfolders (``transformer_branch0/``, ...) listed in ``sd35flash.json`` (``split``),
beside the merged ``transformer/`` that stock diffusers loads. Sampling variants:

* ``merged``: the folder's ``transformer/`` (what ``StableDiffusion3Pipeline`` runs);
* ``unmerged``: step ``i`` at time ``t_i`` runs the branch whose range ``(t_min, t_max]`` holds ``t_i``
  (beyond the paper; K transformers in memory instead of one);
* ``presplit``: the student before split-timestep fine-tuning (when the folder kept it);
* ``auto``: ``unmerged`` when the folder says so (``split.unmerged``), else ``merged``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import UserError
from ..sizes import module_bytes
from .student_info import BranchInfo, StudentInfo, read_student_info

VARIANTS = ("auto", "merged", "unmerged", "presplit")
PRESPLIT_SUBFOLDER = "transformer_presplit"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def branch_subfolder(b: int) -> str:
    return f"transformer_branch{b}"


def branch_ranges(boundaries: Sequence[float]) -> list[tuple[float, float]]:
    """``(t_min, t_max]`` per branch from descending cut points, noisiest first:
    ``[0.5]`` -> ``[(0.5, 1.0), (0.0, 0.5)]``."""
    edges = [1.0, *[float(b) for b in boundaries], 0.0]
    return [(edges[i + 1], edges[i]) for i in range(len(edges) - 1)]


def branch_infos(boundaries: Sequence[float]) -> list[BranchInfo]:
    return [BranchInfo(branch_subfolder(b), lo, hi) for b, (lo, hi) in enumerate(branch_ranges(boundaries))]


def steps_in_range(times: Sequence[float], lo: float, hi: float) -> list[int]:
    """Indices ``i`` of the student times with ``lo < t_i <= hi`` (``times`` without the final 0)."""
    return [i for i, t in enumerate(times) if lo < float(t) <= hi]


class BranchRouter:
    """``(step_index, t) -> module``: the module whose range ``(t_min, t_max]`` holds ``t``. This is
    the per-step routing that ``sampling.sample_latents`` and ``distill.rollout`` accept."""

    def __init__(self, modules: Sequence[torch.nn.Module], ranges: Sequence[tuple[float, float]]) -> None:
        if len(modules) != len(ranges):
            raise ValueError("need one module per range")
        self.modules = list(modules)
        self.ranges = [(float(lo), float(hi)) for lo, hi in ranges]

    def index(self, t: float) -> int:
        t = float(t)
        for b, (lo, hi) in enumerate(self.ranges):
            if lo < t <= hi:
                return b
        raise ValueError(f"no branch covers t = {t}")

    def __call__(self, i: int, t: float) -> torch.nn.Module:
        return self.modules[self.index(t)]


def load_transformer(folder: str | Path, subfolder: str, like: torch.nn.Module) -> torch.nn.Module:
    """An SD3 transformer from ``folder/subfolder`` with the dtype and device of ``like``."""
    from diffusers import SD3Transformer2DModel

    from .pipeline_io import _dtype_kwarg

    path = Path(folder) / subfolder
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is missing; the student folder is incomplete (re-create it with `sd35flash distill` "
                        "or `sd35flash merge`)")
    model = SD3Transformer2DModel.from_pretrained(folder, subfolder=subfolder, **_dtype_kwarg(like.dtype))
    return model.to(like.device).eval()


def _split_info(model: str | Path, variant: str) -> tuple[StudentInfo, object]:
    info = read_student_info(model) if Path(model).is_dir() else None
    if info is None or info.split is None:
        raise UserError(f"--variant {variant} needs a student folder with split-timestep branches; {model} has none "
                        "(distil with split.steps > 0)")
    return info, info.split


def resolve_variant(model: str | Path, variant: str = "auto") -> str:
    """``variant`` with ``auto`` replaced by the folder's default (``unmerged`` when ``split.unmerged``)."""
    if variant not in VARIANTS:
        raise UserError(f"unknown variant '{variant}'; choose one of {', '.join(VARIANTS)}")
    if variant != "auto":
        return variant
    info = read_student_info(model) if Path(model).is_dir() else None
    return "unmerged" if info is not None and info.split is not None and info.split.unmerged else "merged"


def sampling_transformer(pipe, model: str | Path, variant: str = "auto") -> torch.nn.Module | BranchRouter:
    """The transformer (or router) that samples ``model`` in ``variant`` (see the module docstring)."""
    variant = resolve_variant(model, variant)
    if variant == "merged":
        return pipe.transformer
    _, split = _split_info(model, variant)
    if variant == "presplit":
        if not split.presplit:
            raise UserError(f"{model} did not keep the student before the split (split.keep_presplit was false)")
        return load_transformer(model, split.presplit, pipe.transformer)
    modules = [load_transformer(model, b.subfolder, pipe.transformer) for b in split.branches]
    return BranchRouter(modules, [(b.t_min, b.t_max) for b in split.branches])


def param_bytes(model: torch.nn.Module | BranchRouter) -> int:
    """Bytes of the parameters and buffers sampling holds in memory (all branches for a router)."""
    mods = model.modules if isinstance(model, BranchRouter) else [model]
    return module_bytes(*mods)


def file_param_bytes(folder: Path) -> int:
    """Bytes of the tensors stored in ``folder/*.safetensors``, read from the headers (nothing loaded)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                sl = st.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= int(d)
                total += n * _DTYPE_BYTES.get(sl.get_dtype(), 4)
    return total


def memory_report(model: str | Path) -> dict:
    """Transformer parameter bytes of a student folder: merged (one transformer) against unmerged
    (every branch held at once), per branch, and the pre-split student when kept."""
    folder = Path(model)
    _, split = _split_info(folder, "unmerged")
    branches = {b.subfolder: file_param_bytes(folder / b.subfolder) for b in split.branches}
    merged = file_param_bytes(folder / "transformer")
    unmerged = sum(branches.values())
    return {"merged_bytes": merged, "unmerged_bytes": unmerged, "unmerged_over_merged": unmerged / merged,
            "branches": branches, "merge_weights": split.merge_weights, "default_variant":
            "unmerged" if split.unmerged else "merged"}
