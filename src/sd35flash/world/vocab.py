"""The fixed vocabulary of the shapes world.

Independent checks (the judge, the evaluation splits, the tokenizer vocabulary) depend on these
names, so they never change. The palette and canvas are rendering choices of this project.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single_object", "position", "two_objects", "relation", "counting")

#: (colour, shape) pairs that never appear in training images or prompts; the `heldout` split uses them.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("orange", "circle"), ("cyan", "square"), ("yellow", "diamond")}
)

#: Saturated RGB per colour. Chosen so that every pair is far apart both as points and as
#: directions seen from the background (the judge classifies soft edges along background->colour).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 40),
    "green": (30, 200, 60),
    "blue": (40, 80, 240),
    "yellow": (240, 235, 40),
    "purple": (160, 50, 220),
    "orange": (255, 135, 0),
    "cyan": (30, 215, 230),
    "white": (240, 240, 240),
}

#: Plain dark background.
BACKGROUND: tuple[int, int, int] = (16, 16, 24)

#: Default canvas side in pixels. Object sizes scale with the canvas.
IMAGE_SIZE: int = 64

#: Object extents (side of the square bounding box) in pixels at IMAGE_SIZE, per size class.
EXTENT_RANGES: dict[str, tuple[float, float]] = {"small": (12.0, 15.0), "large": (22.0, 28.0)}
