"""Image helpers: grids with captions, atomic PNG writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .io import atomic_write


def make_grid(images: np.ndarray | Sequence[np.ndarray], cols: int | None = None, pad: int = 2,
              captions: Sequence[str] | None = None, scale: int = 1, caption_width: int = 0) -> np.ndarray:
    """Tile uint8 (H, W, 3) images into one grid, optionally upscaled (nearest) and captioned."""
    imgs = [np.asarray(im) for im in images]
    if not imgs:
        raise ValueError("no images to tile")
    if scale > 1:
        imgs = [np.kron(im, np.ones((scale, scale, 1), dtype=im.dtype)) for im in imgs]
    h, w = imgs[0].shape[:2]
    n = len(imgs)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    cap_h = 12 * (2 if captions else 0)
    cell_w = max(w, caption_width)
    grid = np.full((rows * (h + cap_h + pad) + pad, cols * (cell_w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + cap_h + pad), pad + c * (cell_w + pad)
        grid[y : y + h, x : x + w] = im
    if captions:
        pil = Image.fromarray(grid)
        draw = ImageDraw.Draw(pil)
        font = ImageFont.load_default()
        for i, cap in enumerate(captions[:n]):
            r, c = divmod(i, cols)
            y, x = pad + r * (h + cap_h + pad) + h + 1, pad + c * (cell_w + pad)
            words, lines, cur = cap.split(), [], ""
            max_chars = max(4, cell_w // 6)
            for wd in words:
                if len(cur) + len(wd) + 1 > max_chars and cur:
                    lines.append(cur)
                    cur = wd
                else:
                    cur = f"{cur} {wd}".strip()
            lines.append(cur)
            for j, line in enumerate(lines[:2]):
                draw.text((x, y + 11 * j), line, fill=(0, 0, 0), font=font)
        grid = np.asarray(pil)
    return grid


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a PNG atomically (:func:`sd35flash.io.atomic_write`)."""
    arr = np.asarray(image, dtype=np.uint8)
    return atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"), "image")
