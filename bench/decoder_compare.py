"""Side-by-side picture of two VAEs on the same renders: row 1 the renders, row 2 VAE A's round trips
(encode, decode), row 3 VAE B's. Made for the decoder fine-tune stage (docs/img/decoder-finetune.png):

    python bench/decoder_compare.py WORK/vae/final WORK/decoder/final OUT.png [--num 8]
"""

from __future__ import annotations

import argparse

import numpy as np
from diffusers import AutoencoderKL

from sd35flash.imaging import make_grid, save_png
from sd35flash.pretrain.decoder_trainer import roundtrip
from sd35flash.world import render, split_specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vae_a")
    ap.add_argument("vae_b")
    ap.add_argument("out")
    ap.add_argument("--num", type=int, default=8)
    a = ap.parse_args()
    specs = split_specs("val", a.num, seed=5)
    imgs = np.stack([render(s, seed=100 + i) for i, s in enumerate(specs)])
    rows = [imgs] + [roundtrip(AutoencoderKL.from_pretrained(p).eval(), imgs) for p in (a.vae_a, a.vae_b)]
    save_png(a.out, make_grid(np.concatenate(rows), cols=a.num, scale=3))


if __name__ == "__main__":
    main()
