"""``argparse`` value types shared by every command: numbers are parsed, finite and in range at the
boundary, so a bad flag is a one-line usage error before any work starts."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

#: Upper bounds of counts given on the command line (images, specs, scenes, runs).
MAX_COUNT = 1_000_000
#: Seeds are combined with offsets and multipliers downstream; this keeps them in every RNG's range.
MAX_SEED = 2**31 - 1
MAX_STEPS = 1000
MAX_BATCH = 4096
MAX_RESOLUTION = 16384
MAX_GUIDANCE = 100.0


def _parse_number(name: str, text: str) -> float:
    try:
        v = float(text.strip().replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {text!r}")
    return v


def integer(name: str, lo: int = 1, hi: int = MAX_COUNT) -> Callable[[str], int]:
    """An integer in ``[lo, hi]`` (``1e3`` is accepted when it is a whole number)."""

    def parse(text: str) -> int:
        try:
            v = int(text.strip().replace("_", ""))
        except ValueError:
            f = _parse_number(name, text)
            if f != int(f):
                raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
            v = int(f)
        if v < lo:
            raise argparse.ArgumentTypeError(f"{name} must be >= {lo}, got {text}")
        if v > hi:
            raise argparse.ArgumentTypeError(f"{name} must be <= {hi}, got {text}")
        return v

    return parse


def number(name: str, lo: float = 0.0, hi: float = 1e9, lo_open: bool = False) -> Callable[[str], float]:
    """A finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""

    def parse(text: str) -> float:
        v = _parse_number(name, text)
        if v < lo or v > hi or (lo_open and v == lo):
            raise argparse.ArgumentTypeError(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {text}")
        return v

    return parse


def positive_int(name: str) -> Callable[[str], int]:
    """An integer in ``[1, MAX_COUNT]``."""
    return integer(name, 1, MAX_COUNT)


seed = integer("--seed", 0, MAX_SEED)
steps = integer("--steps", 1, MAX_STEPS)
batch_size = integer("--batch-size", 1, MAX_BATCH)
resolution = integer("--resolution", 16, MAX_RESOLUTION)
guidance = number("--guidance", 0.0, MAX_GUIDANCE)


_DURATION_PART = r"(\d+(?:\.\d+)?)\s*(h|min|m|s|)"
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def duration(name: str) -> Callable[[str], float]:
    """Seconds: a number with an optional unit ``s``, ``m``/``min`` or ``h`` (``90m``, ``1.5h``,
    ``5400``), or a sum of such parts (``2h30m``); positive."""

    def parse(text: str) -> float:
        s = text.strip().lower()
        parts = re.findall(_DURATION_PART, s)
        if not parts or re.sub(_DURATION_PART, "", s).strip():
            raise argparse.ArgumentTypeError(f"{name} must be a duration such as 90m, 1.5h or 5400 (seconds), "
                                             f"got {text!r}")
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
        if seconds <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {text!r}")
        return seconds

    return parse


time_limit = duration("--time-limit")
