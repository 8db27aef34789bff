"""Byte counts: of tensors in memory, of modules' parameters and buffers, of files in a folder.

(Quantized tensor subclasses are counted through their stored layout by
:func:`sd35flash.deploy.runtime.quantize.weight_bytes`; the planners count bytes from formulas.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["folder_bytes", "module_bytes", "tensor_bytes"]


def tensor_bytes(tensors: Iterable[torch.Tensor | None], unique_storage: bool = False) -> int:
    """``sum(numel * element_size)`` over ``tensors`` (``None`` skipped); with ``unique_storage`` a
    tensor whose data pointer was already counted is skipped (views and tied weights count once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        if unique_storage:
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def module_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of ``modules`` as they are held in memory."""
    return tensor_bytes(t for m in modules for t in [*m.parameters(), *m.buffers()])


def folder_bytes(folder: str | os.PathLike[str]) -> int:
    """Total size of the files under ``folder`` (recursively)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
