"""Prompt text from scene specs: one canonical form (evaluation) and paraphrases (training).

Every template is plain lowercase ASCII words separated by single spaces, so that the tokenizer
vocabulary is exactly :func:`all_words`. The first template and the first phrase of each table
give the canonical prompt, so the canonical form is always one of the paraphrases.
"""

from __future__ import annotations

import random
import re

from sd35flash.world.spec import MAX_COUNT, ObjectSpec, SceneSpec
from sd35flash.world.vocab import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES

# Placeholders: {np} "a large red circle", {bare} "large red circle", {np0}/{np1}, {bare0}/{bare1},
# {pos} a position phrase, {rel} a relation phrase, {num} a count word or digit, {many} "large red circles".
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "single_object": (
        "{np}",
        "a photo of {np}",
        "an image of {np}",
        "a picture of {np}",
        "{bare}",
        "there is {np}",
        "{np} on a dark background",
        "a single {bare}",
    ),
    "position": (
        "{np} {pos}",
        "a photo of {np} {pos}",
        "an image of {np} {pos}",
        "{bare} {pos}",
        "there is {np} {pos}",
    ),
    "two_objects": (
        "{np0} and {np1}",
        "a photo of {np0} and {np1}",
        "an image of {np0} and {np1}",
        "{bare0} and {bare1}",
        "there is {np0} and {np1}",
        "{np0} with {np1}",
    ),
    "relation": (
        "{np0} {rel} {np1}",
        "a photo of {np0} {rel} {np1}",
        "an image of {np0} {rel} {np1}",
        "{bare0} {rel} {bare1}",
        "there is {np0} {rel} {np1}",
    ),
    "counting": (
        "{num} {many}",
        "a photo of {num} {many}",
        "an image of {num} {many}",
        "exactly {num} {many}",
        "{num} {many} on a dark background",
    ),
}

_POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side", "in the left half", "on the left of the image"),
    "right": ("on the right", "on the right side", "in the right half", "on the right of the image"),
    "top": ("at the top", "at the top of the image", "in the top half", "near the top"),
    "bottom": ("at the bottom", "at the bottom of the image", "in the bottom half", "near the bottom"),
}

_RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left_of": ("left of", "to the left of", "on the left of"),
    "right_of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath", "lower than"),
}

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_PLURALS = {s: s + "s" for s in SHAPES}

_PLACEHOLDER = re.compile(r"\{([a-z0-9_]+)\}")


def _bare(obj: ObjectSpec) -> str:
    words = ([obj.size] if obj.size is not None else []) + [obj.color, obj.shape]
    return " ".join(words)


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _many(obj: ObjectSpec, count: int) -> str:
    words = ([obj.size] if obj.size is not None else []) + [obj.color]
    words.append(obj.shape if count == 1 else _PLURALS[obj.shape])
    return " ".join(words)


def _fill(spec: SceneSpec, template: str, rng: random.Random | None, digits: bool) -> str:
    """Substitute the placeholders of ``template``; phrases are canonical when rng is None."""

    def pick(options: tuple[str, ...]) -> str:
        return options[0] if rng is None else rng.choice(options)

    values: dict[str, str] = {}
    for i, obj in enumerate(spec.objects):
        values[f"bare{i}"] = _bare(obj)
        values[f"np{i}"] = _with_article(_bare(obj))
    values["bare"] = values["bare0"]
    values["np"] = values["np0"]
    if spec.position is not None:
        values["pos"] = pick(_POSITION_PHRASES[spec.position])
    if spec.relation is not None:
        values["rel"] = pick(_RELATION_PHRASES[spec.relation])
    if spec.count is not None:
        values["num"] = str(spec.count) if digits else _NUMBER_WORDS[spec.count]
        values["many"] = _many(spec.objects[0], spec.count)
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def canonical_prompt(spec: SceneSpec) -> str:
    """The one fixed prompt of a spec, used in evaluation.

    Examples: "a large red circle", "a blue square on the left", "a yellow triangle and a green
    circle", "a red circle left of a blue square", "three white diamonds", "one white diamond".
    A null size is omitted.
    """
    return _fill(spec, _TEMPLATES[spec.category][0], None, digits=False)


def paraphrase(spec: SceneSpec, rng: random.Random) -> str:
    """A random paraphrase of the spec's prompt (training). The canonical form is one of them."""
    template = rng.choice(_TEMPLATES[spec.category])
    digits = spec.count is not None and rng.random() < 0.3
    return _fill(spec, template, rng, digits=digits)


def all_words() -> list[str]:
    """Every word any template can produce (sorted), digits included: the tokenizer vocabulary."""
    words: set[str] = set()

    def add(text: str) -> None:
        words.update(_PLACEHOLDER.sub(" ", text).split())

    for templates in _TEMPLATES.values():
        for t in templates:
            add(t)
    for table in (_POSITION_PHRASES, _RELATION_PHRASES):
        for phrases in table.values():
            for ph in phrases:
                add(ph)
    words.update(("a", "an"))
    words.update(SHAPES)
    words.update(_PLURALS.values())
    words.update(COLORS)
    words.update(SIZES)
    words.update(_NUMBER_WORDS.values())
    words.update(str(n) for n in range(1, MAX_COUNT + 1))
    assert set(_POSITION_PHRASES) == set(POSITIONS) and set(_RELATION_PHRASES) == set(RELATIONS)
    return sorted(words)
