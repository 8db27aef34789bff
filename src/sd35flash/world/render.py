"""Ground-truth renderer of the shapes world.

Filled, axis-aligned shapes with a square bounding box of side ``extent`` (circle; square;
triangle pointing up; diamond = square turned 45 degrees), on a plain dark background, drawn at 4x
with PIL and box-downsampled (anti-aliased). The layout is deterministic in (spec, seed) and uses
``numpy.random.default_rng(seed)`` only.

Layout rules, at 64 px (everything scales with the canvas):

- extent: small 12-15 px, large 22-28 px (uniform jitter); a null size picks either class;
- bounding boxes stay 2 px inside the canvas and 3.5 px apart (objects never overlap);
- position: the centre lies in the named band (left: cx <= 0.4 W, ...) and the main-axis offset
  from the canvas centre exceeds the off-axis offset by >= 3 px;
- relation: centres >= 16 px apart on the main axis, far enough that the boxes are separated on it,
  and the off-axis offset is >= 4 px smaller than the main-axis one;
- single_object, two_objects, counting: uniform random non-overlapping placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from sd35flash.world.spec import SceneSpec
from sd35flash.world.vocab import BACKGROUND, EXTENT_RANGES, IMAGE_SIZE, PALETTE, SIZES

SUPERSAMPLE = 4
#: Layout constants in pixels at 64 px; scaled by size / 64.
MARGIN = 2.0
GAP = 3.5
POSITION_BAND = 0.4  # fraction of the canvas side
POSITION_DOMINANCE = 3.0
RELATION_MIN_DISTANCE = 16.0
RELATION_DOMINANCE = 4.0
_GRID_STEP = 0.5


@dataclass(frozen=True)
class Placed:
    """One drawn object: its classes and its geometry in pixels (center and bounding-box side)."""

    shape: str
    color: str
    size: str
    center: tuple[float, float]
    extent: float


def _sample_extent(size_class: str, rng: np.random.Generator, scale: float) -> float:
    lo, hi = EXTENT_RANGES[size_class]
    return float(rng.uniform(lo, hi)) * scale


def _separated(a: tuple[float, float, float], b: tuple[float, float, float], gap: float) -> bool:
    dx = abs(a[0] - b[0]) - (a[2] + b[2]) / 2
    dy = abs(a[1] - b[1]) - (a[2] + b[2]) / 2
    return max(dx, dy) >= gap


def _shrink(extents: list[float], classes: list[str], scale: float) -> list[float]:
    return [EXTENT_RANGES[c][0] * scale + 0.7 * (s - EXTENT_RANGES[c][0] * scale) for s, c in zip(extents, classes)]


def _place_random(extents: list[float], classes: list[str], side: int,
                  rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Uniform non-overlapping placement, one object at a time on a 0.5 px grid of centres."""
    scale = side / IMAGE_SIZE
    margin, gap = MARGIN * scale, GAP * scale
    for attempt in range(60):
        placed: list[tuple[float, float, float]] = []
        for s in extents:
            axis = np.arange(margin + s / 2, side - margin - s / 2 + 1e-9, _GRID_STEP * scale)
            cx, cy = np.meshgrid(axis, axis, indexing="xy")
            ok = np.ones(cx.shape, dtype=bool)
            for px, py, ps in placed:
                dx = np.abs(cx - px) - (s + ps) / 2
                dy = np.abs(cy - py) - (s + ps) / 2
                ok &= np.maximum(dx, dy) >= gap
            idx = np.flatnonzero(ok)
            if idx.size == 0:
                break
            k = int(idx[rng.integers(idx.size)])
            placed.append((float(cx.flat[k]), float(cy.flat[k]), s))
        if len(placed) == len(extents):
            return placed
        if attempt % 6 == 5:
            extents = _shrink(extents, classes, scale)
    raise RuntimeError("could not place the objects without overlap")  # unreachable for <= 3 objects at 64 px


def _place_position(s: float, position: str, side: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """Place in canonical 'left' frame, then mirror / transpose."""
    scale = side / IMAGE_SIZE
    margin = MARGIN * scale
    half = side / 2
    lo = margin + s / 2
    hi = POSITION_BAND * side - 0.5 * scale
    main = float(rng.uniform(lo, max(lo, hi)))
    room = min(half - main - POSITION_DOMINANCE * scale, half - margin - s / 2)
    off = half + float(rng.uniform(-room, room)) if room > 0 else half
    x, y = main, off
    if position == "right":
        x = side - x
    elif position == "top":
        x, y = off, main
    elif position == "bottom":
        x, y = off, side - main
    return (x, y, s)


def _place_relation(
    s0: float, s1: float, relation: str, side: int, rng: np.random.Generator
) -> list[tuple[float, float, float]]:
    """Place object 0 <relation> object 1: canonical frame is 'left_of', then swap / transpose."""
    scale = side / IMAGE_SIZE
    margin, gap = MARGIN * scale, GAP * scale
    # In the canonical frame object ``a`` is left of object ``b``.
    swap = relation in ("right_of", "below")
    sa, sb = (s1, s0) if swap else (s0, s1)
    lo_a, hi_a = margin + sa / 2, side - margin - sa / 2
    lo_b, hi_b = margin + sb / 2, side - margin - sb / 2
    min_main = max(RELATION_MIN_DISTANCE * scale, (sa + sb) / 2 + gap)
    for _ in range(200):
        xa = float(rng.uniform(lo_a, max(lo_a, hi_b - min_main)))
        xb = float(rng.uniform(max(lo_b, xa + min_main), max(hi_b, xa + min_main)))
        d = xb - xa
        if xb > hi_b + 1e-9 or d < min_main - 1e-9:
            continue
        limit = d - RELATION_DOMINANCE * scale
        ya = float(rng.uniform(lo_a, hi_a))
        ylo, yhi = max(lo_b, ya - limit), min(hi_b, ya + limit)
        if ylo > yhi:
            continue
        yb = float(rng.uniform(ylo, yhi))
        a, b = (xa, ya, sa), (xb, yb, sb)
        if _separated(a, b, gap):
            break
    else:  # pragma: no cover - the ranges above always admit a solution at <= 28 px objects
        raise RuntimeError("could not place the relation scene")
    if relation in ("above", "below"):
        a, b = (a[1], a[0], a[2]), (b[1], b[0], b[2])
    return [b, a] if swap else [a, b]


def layout(spec: SceneSpec, seed: int, size: int = IMAGE_SIZE) -> list[Placed]:
    """The objects to draw for ``spec``: classes, centres and extents (deterministic in spec, seed)."""
    rng = np.random.default_rng(seed)
    scale = size / IMAGE_SIZE
    objs = list(spec.objects)
    if spec.category == "counting":
        objs = objs * int(spec.count or 1)
    classes = [o.size if o.size is not None else SIZES[int(rng.integers(len(SIZES)))] for o in objs]
    extents = [_sample_extent(c, rng, scale) for c in classes]
    if spec.category == "position":
        boxes = [_place_position(extents[0], str(spec.position), size, rng)]
    elif spec.category == "relation":
        boxes = _place_relation(extents[0], extents[1], str(spec.relation), size, rng)
    else:
        boxes = _place_random(extents, classes, size, rng)
    return [
        Placed(shape=o.shape, color=o.color, size=c, center=(x, y), extent=s)
        for o, c, (x, y, s) in zip(objs, classes, boxes)
    ]


def draw(placed: list[Placed], size: int = IMAGE_SIZE) -> np.ndarray:
    """Rasterise placed objects: (size, size, 3) uint8, anti-aliased by 4x supersampling."""
    ss = SUPERSAMPLE
    canvas = Image.new("RGB", (size * ss, size * ss), BACKGROUND)
    pen = ImageDraw.Draw(canvas)
    for p in placed:
        cx, cy = p.center[0] * ss, p.center[1] * ss
        h = p.extent * ss / 2
        fill = PALETTE[p.color]
        left, right, top, bottom = cx - h, cx + h, cy - h, cy + h
        if p.shape == "circle":
            pen.ellipse((left, top, right - 1, bottom - 1), fill=fill)
        elif p.shape == "square":
            pen.rectangle((round(left), round(top), round(right) - 1, round(bottom) - 1), fill=fill)
        elif p.shape == "triangle":
            pen.polygon([(cx, top), (right, bottom), (left, bottom)], fill=fill)
        elif p.shape == "diamond":
            pen.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=fill)
        else:  # pragma: no cover - ObjectSpec validates shapes
            raise ValueError(f"unknown shape {p.shape!r}")
    return np.asarray(canvas.reduce(ss), dtype=np.uint8)


def render_with_layout(spec: SceneSpec, seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[Placed]]:
    """Render ``spec`` and return the image (H, W, 3 uint8) with what was drawn where."""
    placed = layout(spec, seed, size)
    return draw(placed, size), placed


def render(spec: SceneSpec, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render ``spec`` as an (H, W, 3) uint8 image, deterministic in (spec, seed)."""
    return render_with_layout(spec, seed, size)[0]
