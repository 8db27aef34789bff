"""Anchors that make ``fd_effnet`` readable: the floor and two kinds of bad model.

All are FDs against the same reference set ``eval`` uses (renders of the specs with the fixed
reference seeds):

- ``floor``: renders of the *same* specs with other seeds -- a perfect model;
- ``mismatched_specs``: renders of specs that each differ from the prompt in one attribute (colour,
  shape, size, count, position, relation or category) -- a model that draws clean but wrong scenes.
  FD is a distribution-level metric, so this stays close to the floor: misalignment is the judge's
  job, not FD's;
- ``junk``: irregular blobs painted in each prompt's colours -- what a half-trained model draws.
"""

from __future__ import annotations

import random

import numpy as np
from tqdm.auto import tqdm

from ..seeds import derive_seed
from ..world import render, render_with_layout, split_specs
from ..world.selftest import junk_image, perturb
from .evaluator import REFERENCE_SEED
from .fd import FDScorer


def fd_scale(split: str = "test", num: int = 200, seed: int = 1, progress: bool = True) -> dict:
    specs = split_specs(split, num, seed=0)
    refs = np.stack([render(s, seed=REFERENCE_SEED + i) for i, s in enumerate(specs)])
    other, wrong, junk = [], [], []
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    for i, s in enumerate(tqdm(specs, desc="render anchors", disable=not progress, leave=False)):
        img, placed = render_with_layout(s, seed=derive_seed(seed, i, stride=7_777_777))
        other.append(img)
        _, bad = perturb(s, placed, rng)
        wrong.append(render(bad, seed=derive_seed(seed, i, stride=7_777_777)))
        junk.append(junk_image(s, nrng, refs.shape[1]))
    scorer = FDScorer()
    ref_feats = scorer.features(refs)
    out = {"split": split, "num_images": num}
    for name, imgs in (("floor", other), ("mismatched_specs", wrong), ("junk", junk)):
        out[name] = scorer.fd_from_features(ref_feats, scorer.features(np.stack(imgs)))
    return out
