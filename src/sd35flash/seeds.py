"""Seed derivation: one base seed (``--seed``, ``runtime.seed``, ``data_seed``) gives a stream of
per-item seeds ``seed * stride + index``.

The stride is a prime larger than any index a stream uses, so the streams of two base seeds do not
overlap (``derive_seed(a, i) != derive_seed(b, j)`` for ``a != b`` and ``0 <= i, j < stride``).
The values are part of every result's reproducibility (evaluation images, training data order,
cached trajectories): a stride never changes.
"""

from __future__ import annotations

__all__ = ["EPOCH_STRIDE", "ITEM_STRIDE", "derive_seed"]

#: Per item of a job: an image, a prompt, a training step.
ITEM_STRIDE = 1_000_003
#: Per epoch of a seeded permutation.
EPOCH_STRIDE = 100_003


def derive_seed(seed: int, index: int, stride: int = ITEM_STRIDE) -> int:
    """``seed * stride + index``: the seed of item ``index`` of the stream of ``seed``."""
    return seed * stride + index
