"""Seed derivation: the streams are the ones every result was produced with, and do not overlap."""

from __future__ import annotations

from sd35flash.seeds import EPOCH_STRIDE, ITEM_STRIDE, derive_seed
from sd35flash.train.data import EpochSampler


def test_streams_keep_their_values():
    # the evaluation images of --seed 0 / 1 and the first epoch order of a sampler seeded 5
    assert [derive_seed(0, i) for i in range(3)] == [0, 1, 2]
    assert derive_seed(1, 2) == 1_000_005 and derive_seed(7, 17) == 7_000_038
    assert derive_seed(5, 0, EPOCH_STRIDE) == 500_015
    import torch

    want = torch.randperm(10, generator=torch.Generator().manual_seed(500_015))
    assert torch.equal(EpochSampler(10, seed=5)._perm, want)


def test_streams_of_different_seeds_do_not_overlap():
    for stride in (ITEM_STRIDE, EPOCH_STRIDE):
        a = {derive_seed(3, i, stride) for i in range(0, stride, 997)}
        b = {derive_seed(4, i, stride) for i in range(0, stride, 991)}
        assert not a & b and len(a) == len(range(0, stride, 997))
