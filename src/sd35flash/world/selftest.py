"""Self-test of the judge: accuracy on renders, false acceptance of mismatches and of junk.

Per category, ``num`` random specs are rendered and judged three ways:

- **accuracy**: the render against its own spec (should be accepted);
- **false_accept**: the render against a spec that differs in exactly one meaningful attribute
  (an object's colour or shape, the count, the position, the relation, a size class, or a spec of
  another category with a different number of objects) (should be rejected);
- **junk_accept**: an image of irregular blobs painted in the spec's colours, one per object,
  against the spec (should be rejected).

``degraded=True`` blurs (gaussian, sigma 0.7 px) and adds pixel noise (std 8/255) to every image
first, the way a VAE/diffusion sample is softer and noisier than a render.

Run: ``python -m sd35flash.world.selftest --num 200 [--degraded]``.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from sd35flash.world.generate import random_spec
from sd35flash.world.judge import judge
from sd35flash.world.render import Placed, render_with_layout
from sd35flash.world.spec import MAX_COUNT, ObjectSpec, SceneSpec
from sd35flash.world.vocab import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    EXTENT_RANGES,
    IMAGE_SIZE,
    PALETTE,
    POSITIONS,
    RELATIONS,
    SHAPES,
)

_SS = 4


def degrade(image: np.ndarray, rng: np.random.Generator, blur_sigma: float = 0.7, noise_std: float = 8.0) -> np.ndarray:
    """Gaussian blur (sigma in px) plus gaussian pixel noise (std in 0..255 units), as uint8."""
    f = ndimage.gaussian_filter(image.astype(np.float32), sigma=(blur_sigma, blur_sigma, 0))
    f += rng.normal(0.0, noise_std, size=f.shape).astype(np.float32)
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def _blob_polygon_star(rng: np.random.Generator, r: float) -> list[tuple[float, float]]:
    n = int(rng.integers(5, 11))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * rng.uniform(0.35, 1.0, n)
    return [(float(a * np.cos(t)), float(a * np.sin(t))) for a, t in zip(radii, angles)]


def _ellipse_polygon(cx: float, cy: float, ax: float, ay: float, rot: float) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    x, y = ax * np.cos(t), ay * np.sin(t)
    c, s = np.cos(rot), np.sin(rot)
    return [(float(cx + c * a - s * b), float(cy + s * a + c * b)) for a, b in zip(x, y)]


def _draw_blob(pen: ImageDraw.ImageDraw, rng: np.random.Generator, cx: float, cy: float, extent: float,
               fill: tuple[int, int, int]) -> None:
    """One irregular blob of about ``extent`` pixels (already in supersampled units)."""
    r = extent / 2
    kind = int(rng.integers(3))
    if kind == 0:  # union of random ellipses
        for _ in range(int(rng.integers(2, 5))):
            ox, oy = rng.uniform(-0.45 * r, 0.45 * r, 2)
            ax, ay = r * rng.uniform(0.25, 0.7, 2)
            pen.polygon(_ellipse_polygon(cx + ox, cy + oy, ax, ay, float(rng.uniform(0, np.pi))), fill=fill)
    elif kind == 1:  # random star-shaped polygon
        pts = _blob_polygon_star(rng, r)
        pen.polygon([(cx + x, cy + y) for x, y in pts], fill=fill)
    else:  # cluster of random strokes and dots
        for _ in range(int(rng.integers(3, 7))):
            x0, y0, x1, y1 = rng.uniform(-0.8 * r, 0.8 * r, 4)
            pen.line([(cx + x0, cy + y0), (cx + x1, cy + y1)], fill=fill, width=max(1, int(r * rng.uniform(0.2, 0.5))))


def junk_image(spec: SceneSpec, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Irregular blobs painted in the spec's colours, one per expected object, roughly object-sized.

    This is what a half-trained model paints: the right colours in the wrong shapes.
    """
    scale = size / IMAGE_SIZE * _SS
    colors = [o.color for o in spec.objects]
    if spec.category == "counting":
        colors = colors * int(spec.count or 1)
    canvas = Image.new("RGB", (size * _SS, size * _SS), BACKGROUND)
    pen = ImageDraw.Draw(canvas)
    lo, hi = EXTENT_RANGES["small"][0], EXTENT_RANGES["large"][1]
    for color in colors:
        extent = float(rng.uniform(lo, hi)) * scale
        cx, cy = rng.uniform(extent / 2, size * _SS - extent / 2, 2)
        _draw_blob(pen, rng, float(cx), float(cy), extent, PALETTE[color])
    return np.asarray(canvas.reduce(_SS), dtype=np.uint8)


def _distinct(objects: list[ObjectSpec]) -> bool:
    pairs = [o.pair for o in objects]
    return len(set(pairs)) == len(pairs)


def _other(options: tuple[str, ...], current: str, rng: random.Random) -> str:
    return rng.choice([o for o in options if o != current])


def perturb(spec: SceneSpec, placed: list[Placed], rng: random.Random) -> tuple[str, SceneSpec]:
    """A spec that differs from ``spec`` in exactly one meaningful attribute, so that a render of
    ``spec`` (whose drawn objects are ``placed``) must not satisfy it. Returns (kind, new spec)."""
    kinds = ["color", "shape", "size", "category"]
    kinds += {"counting": ["count"], "position": ["position"], "relation": ["relation"]}.get(spec.category, [])
    kind = rng.choice(kinds)
    objs = list(spec.objects)
    if kind in ("color", "shape"):
        for _ in range(100):
            i = rng.randrange(len(objs))
            o = objs[i]
            new = (
                replace(o, color=_other(COLORS, o.color, rng))
                if kind == "color"
                else replace(o, shape=_other(SHAPES, o.shape, rng))
            )
            cand = objs[:i] + [new] + objs[i + 1 :]
            if _distinct(cand):
                return kind, replace(spec, objects=tuple(cand))
        raise RuntimeError("no distinct perturbation found")  # pragma: no cover
    if kind == "size":
        sized = [i for i, o in enumerate(objs) if o.size is not None]
        if sized:
            i = rng.choice(sized)
            new_size = "large" if objs[i].size == "small" else "small"
        else:  # ask for the class object i was not drawn in
            i = rng.randrange(len(objs))
            new_size = "large" if placed[i].size == "small" else "small"
        objs[i] = replace(objs[i], size=new_size)
        return kind, replace(spec, objects=tuple(objs))
    if kind == "count":
        return kind, replace(spec, count=rng.choice([c for c in range(1, MAX_COUNT + 1) if c != spec.count]))
    if kind == "position":
        return kind, replace(spec, position=_other(POSITIONS, str(spec.position), rng))
    if kind == "relation":
        return kind, replace(spec, relation=_other(RELATIONS, str(spec.relation), rng))
    # A spec of another category that needs a different number of objects.
    a = objs[0]
    n_drawn = len(placed)
    extra_pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in {o.pair for o in objs}]
    extra_c, extra_s = rng.choice(extra_pairs)
    extra = ObjectSpec(shape=extra_s, color=extra_c, size=None)
    options: list[SceneSpec] = []
    if n_drawn != 1:
        options.append(SceneSpec(category="single_object", objects=(a,)))
        options.append(SceneSpec(category="position", objects=(a,), position=rng.choice(POSITIONS)))
    if n_drawn != 2:
        options.append(SceneSpec(category="two_objects", objects=(a, extra)))
        options.append(SceneSpec(category="relation", objects=(a, extra), relation=rng.choice(RELATIONS)))
    options.append(SceneSpec(category="counting", objects=(a,),
                             count=rng.choice([c for c in range(1, MAX_COUNT + 1) if c != n_drawn])))
    return kind, rng.choice([o for o in options if o.category != spec.category])


def _rates(results: dict[str, list[bool]]) -> dict[str, float]:
    return {
        "accuracy": float(np.mean(results["accuracy"])),
        "false_accept": float(np.mean(results["false_accept"])),
        "junk_accept": float(np.mean(results["junk_accept"])),
    }


def run_selftest(num: int, seed: int = 0, progress: bool = False, degraded: bool = False,
                 size: int = IMAGE_SIZE) -> dict:
    """Measure the judge; see the module docstring. ``num`` scenes per category."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    rng = random.Random(f"sd35flash-selftest/{seed}")
    nrng = np.random.default_rng(seed)
    per_category: dict[str, dict[str, float]] = {}
    overall: dict[str, list[bool]] = {"accuracy": [], "false_accept": [], "junk_accept": []}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num * len(CATEGORIES), desc="judge self-test", unit="scene")

    def prep(img: np.ndarray) -> np.ndarray:
        return degrade(img, nrng) if degraded else img

    for category in CATEGORIES:
        res: dict[str, list[bool]] = {"accuracy": [], "false_accept": [], "junk_accept": []}
        for _ in range(num):
            spec = random_spec(category, rng, heldout=rng.random() < 0.2)
            img, placed = render_with_layout(spec, rng.getrandbits(32), size)
            img = prep(img)
            res["accuracy"].append(judge(img, spec).correct)
            _, wrong = perturb(spec, placed, rng)
            res["false_accept"].append(judge(img, wrong).correct)
            res["junk_accept"].append(judge(prep(junk_image(spec, nrng, size)), spec).correct)
            if bar is not None:
                bar.update(1)
        per_category[category] = _rates(res)
        for k, v in res.items():
            overall[k].extend(v)
    if bar is not None:
        bar.close()
    return {**_rates(overall), "num": num, "degraded": degraded, "per_category": per_category}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Self-test of the shapes-world judge.")
    parser.add_argument("--num", type=int, default=200, help="scenes per category")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--degraded", action="store_true", help="blur and noise every image first")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(run_selftest(args.num, args.seed, progress=args.progress, degraded=args.degraded), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
