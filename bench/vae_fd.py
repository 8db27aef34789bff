"""How much of a teacher's fd_effnet its VAE alone costs: FD against the reference renders that
`sd35flash eval` uses, for renders of the same specs with other seeds (the floor) and for the same
renders passed through the pipeline's VAE (encode, decode). A teacher cannot draw better than its
VAE decodes, so the second figure is the FD floor of any model on that VAE.

    python bench/vae_fd.py TEACHER [--split test] [--num 400] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sd35flash.evaluate.evaluator import REFERENCE_SEED
from sd35flash.evaluate.fd import FDScorer
from sd35flash.models.pipeline_io import load_pipeline
from sd35flash.pretrain.vae_trainer import roundtrip
from sd35flash.seeds import derive_seed
from sd35flash.world import render, split_specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher")
    ap.add_argument("--split", default="test")
    ap.add_argument("--num", type=int, default=400)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    specs = split_specs(a.split, a.num, seed=0)
    refs = np.stack([render(s, seed=REFERENCE_SEED + i) for i, s in enumerate(specs)])
    other = np.stack([render(s, seed=derive_seed(1, i, stride=7_777_777)) for i, s in enumerate(specs)])
    vae = load_pipeline(a.teacher).vae.eval()
    recon = roundtrip(vae, other)
    psnr = float(10 * np.log10(255.0 ** 2 / np.mean((recon.astype(np.float64) - other) ** 2)))
    scorer = FDScorer()
    ref_feats = scorer.features(refs)
    res = {"teacher": a.teacher, "split": a.split, "num_images": a.num, "vae_psnr_db": round(psnr, 2),
           "fd_floor_renders": scorer.fd_from_features(ref_feats, scorer.features(other)),
           "fd_vae_reconstructions": scorer.fd_from_features(ref_feats, scorer.features(recon))}
    print(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
