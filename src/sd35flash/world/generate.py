"""Random scene specs and the fixed train/val/test/heldout splits."""

from __future__ import annotations

import random

from sd35flash.errors import SpecError
from sd35flash.world.spec import MAX_COUNT, ObjectSpec, SceneSpec
from sd35flash.world.vocab import (
    CATEGORIES,
    COLORS,
    HELDOUT_PAIRS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
)

SPLITS: tuple[str, ...] = ("train", "val", "test", "heldout")
#: Fixed per-split seed offsets, so that the splits never share a random stream.
SPLIT_SEED_OFFSETS: dict[str, int] = {"train": 0, "val": 1_000_003, "test": 2_000_029, "heldout": 3_000_073}
#: Probability that an object's size is null ("any size").
NULL_SIZE_PROB = 0.3

_ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
_SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in _ALL_PAIRS if p not in HELDOUT_PAIRS)
_HELDOUT_SORTED: tuple[tuple[str, str], ...] = tuple(sorted(HELDOUT_PAIRS))


def _random_size(rng: random.Random) -> str | None:
    return None if rng.random() < NULL_SIZE_PROB else rng.choice(SIZES)


def _obj(pair: tuple[str, str], rng: random.Random) -> ObjectSpec:
    return ObjectSpec(shape=pair[1], color=pair[0], size=_random_size(rng))


def random_spec(category: str, rng: random.Random, heldout: bool = False) -> SceneSpec:
    """A random spec of ``category``.

    heldout=False: no object uses a pair of HELDOUT_PAIRS. heldout=True: at least one object does.
    Two-object scenes always use two different (colour, shape) pairs.
    """
    if category not in CATEGORIES:
        raise SpecError(f"unknown category {category!r}; use one of {', '.join(CATEGORIES)}")
    n = 2 if category in ("two_objects", "relation") else 1
    if heldout:
        first = rng.choice(_HELDOUT_SORTED)
        pairs = [first]
        if n == 2:
            pairs.append(rng.choice([p for p in _ALL_PAIRS if p != first]))
            rng.shuffle(pairs)
    else:
        pairs = rng.sample(_SEEN_PAIRS, n)
    objects = tuple(_obj(p, rng) for p in pairs)
    relation = rng.choice(RELATIONS) if category == "relation" else None
    position = rng.choice(POSITIONS) if category == "position" else None
    count = rng.randint(1, MAX_COUNT) if category == "counting" else None
    return SceneSpec(category=category, objects=objects, relation=relation, position=position, count=count)


def split_specs(split: str, n: int, seed: int = 0) -> list[SceneSpec]:
    """``n`` specs of a split, round-robin over CATEGORIES, deterministic in (split, n, seed).

    Only the ``heldout`` split uses HELDOUT_PAIRS (every one of its specs does).
    """
    if split not in SPLITS:
        raise SpecError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if n < 0:
        raise SpecError(f"number of specs must be >= 0, got {n}")
    rng = random.Random(f"sd35flash-world/{split}/{SPLIT_SEED_OFFSETS[split] + int(seed)}")
    heldout = split == "heldout"
    return [random_spec(CATEGORIES[i % len(CATEGORIES)], rng, heldout=heldout) for i in range(n)]
