"""Scene specs: what an image of the shapes world should show, and their JSON Lines format.

One spec per line::

    {"category": "relation", "objects": [{"shape": "circle", "color": "red", "size": "large"},
     {"shape": "square", "color": "blue", "size": null}], "relation": "left_of", "position": null,
     "count": null}

Category rules:

- ``single_object``: 1 object.
- ``position``: 1 object and a ``position`` (left/right/top/bottom).
- ``two_objects``: 2 objects.
- ``relation``: 2 objects and a ``relation``: object 0 <relation> object 1.
- ``counting``: 1 object and a ``count`` in 1..3; the image holds ``count`` copies of it.

``size: null`` means any size. Fields a category does not use must be null.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sd35flash.errors import SpecError
from sd35flash.world.vocab import (
    CATEGORIES,
    COLORS,
    HELDOUT_PAIRS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
)

_SCENE_KEYS = ("category", "objects", "relation", "position", "count")
_OBJECT_KEYS = ("shape", "color", "size")
_NUM_OBJECTS = {"single_object": 1, "position": 1, "two_objects": 2, "relation": 2, "counting": 1}
MAX_COUNT = 3


def _check_choice(value: Any, choices: tuple[str, ...], what: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise SpecError(f"{what} {value!r} is not valid; use one of {', '.join(choices)}")


@dataclass(frozen=True)
class ObjectSpec:
    """One object: a shape in a colour, with a size class or ``None`` for any size."""

    shape: str
    color: str
    size: str | None = None

    def __post_init__(self) -> None:
        _check_choice(self.shape, SHAPES, "shape")
        _check_choice(self.color, COLORS, "color")
        if self.size is not None:
            _check_choice(self.size, SIZES, "size")

    @property
    def pair(self) -> tuple[str, str]:
        """The (colour, shape) pair, as in HELDOUT_PAIRS."""
        return (self.color, self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "size": self.size}

    @classmethod
    def from_dict(cls, d: Any) -> "ObjectSpec":
        if not isinstance(d, dict):
            raise SpecError(f"each object must be a JSON object with keys {', '.join(_OBJECT_KEYS)}; got {d!r}")
        unknown = sorted(set(d) - set(_OBJECT_KEYS))
        if unknown:
            raise SpecError(f"unknown object key(s) {', '.join(map(repr, unknown))}; "
                            f"allowed: {', '.join(_OBJECT_KEYS)}")
        for key in ("shape", "color"):
            if key not in d:
                raise SpecError(f"object is missing key {key!r}; each object needs shape, color and size")
        return cls(shape=d["shape"], color=d["color"], size=d.get("size"))


@dataclass(frozen=True)
class SceneSpec:
    """A scene: a category, its objects, and the category's extra field (relation/position/count)."""

    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    position: str | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        _check_choice(self.category, CATEGORIES, "category")
        objects = self.objects
        if isinstance(objects, list):
            objects = tuple(objects)
            object.__setattr__(self, "objects", objects)
        if not isinstance(objects, tuple) or not all(isinstance(o, ObjectSpec) for o in objects):
            raise SpecError("objects must be a sequence of ObjectSpec")
        want = _NUM_OBJECTS[self.category]
        if len(objects) != want:
            raise SpecError(
                f"category {self.category!r} needs exactly {want} object(s), got {len(objects)}"
            )
        self._check_field("relation", RELATIONS, self.category == "relation")
        self._check_field("position", POSITIONS, self.category == "position")
        if self.category == "counting":
            c = self.count
            if isinstance(c, bool) or not isinstance(c, int):
                raise SpecError(f"category 'counting' needs an integer count in 1..{MAX_COUNT}, got {c!r}")
            if not 1 <= c <= MAX_COUNT:
                raise SpecError(f"count {c} is out of range; use an integer in 1..{MAX_COUNT}")
        elif self.count is not None:
            raise SpecError(f"count must be null for category {self.category!r}; only 'counting' uses it")

    def _check_field(self, name: str, choices: tuple[str, ...], required: bool) -> None:
        value = getattr(self, name)
        if required:
            if value is None:
                raise SpecError(f"category {self.category!r} needs a {name}; use one of {', '.join(choices)}")
            _check_choice(value, choices, name)
        elif value is not None:
            raise SpecError(f"{name} must be null for category {self.category!r}; only category {name!r} uses it")

    def uses_heldout_pair(self) -> bool:
        """True when any object's (colour, shape) is one of HELDOUT_PAIRS."""
        return any(o.pair in HELDOUT_PAIRS for o in self.objects)

    def to_dict(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "objects": [o.to_dict() for o in self.objects],
            "relation": self.relation,
            "position": self.position,
            "count": self.count,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any) -> "SceneSpec":
        """Build and validate a spec from its JSON dict. Raises SpecError naming the problem."""
        if not isinstance(d, dict):
            raise SpecError(f"a scene spec must be a JSON object with keys {', '.join(_SCENE_KEYS)}; "
                            f"got {type(d).__name__}")
        unknown = sorted(set(d) - set(_SCENE_KEYS))
        if unknown:
            raise SpecError(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(_SCENE_KEYS)}")
        for key in ("category", "objects"):
            if key not in d:
                raise SpecError(f"spec is missing key {key!r}; every spec needs category and objects")
        objs = d["objects"]
        if not isinstance(objs, list):
            raise SpecError(f"objects must be a JSON list, got {type(objs).__name__}")
        return cls(
            category=d["category"],
            objects=tuple(ObjectSpec.from_dict(o) for o in objs),
            relation=d.get("relation"),
            position=d.get("position"),
            count=d.get("count"),
        )


def read_jsonl(path: str | os.PathLike[str]) -> list[SceneSpec]:
    """Read specs from a JSON Lines file (blank lines are skipped).

    Raises SpecError naming the file and line for malformed JSON or an invalid spec, and for a
    missing or empty file.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"spec file {p} does not exist; pass a path to a .jsonl file of scene specs") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as e:
        raise SpecError(f"cannot read spec file {p}: {e}; pass a readable UTF-8 .jsonl file") from None
    specs: list[SceneSpec] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecError(f"{p}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); fix that line") from None
        try:
            specs.append(SceneSpec.from_dict(d))
        except SpecError as e:
            raise SpecError(f"{p}:{lineno}: {e}") from None
    if not specs:
        raise SpecError(f"spec file {p} holds no specs; write one JSON scene spec per line")
    return specs


def write_jsonl(path: str | os.PathLike[str], specs: Iterable[SceneSpec]) -> None:
    """Write specs as JSON Lines, atomically (temp file in the same folder, then os.replace)."""
    from ..io import atomic_write_text

    atomic_write_text(path, "".join(s.to_json() + "\n" for s in specs), "spec file")
