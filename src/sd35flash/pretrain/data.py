"""Shapes-world training data: rendered images, their specs, paraphrased prompts, cached latents."""

from __future__ import annotations

import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..io import atomic_torch_save
from ..seeds import derive_seed
from ..world import SceneSpec, paraphrase, render, split_specs


@dataclass
class WorldImages:
    """``n`` training scenes: ``specs[i]`` rendered with seed ``seed_base + i`` into ``images[i]``."""

    specs: list[SceneSpec]
    images: np.ndarray  # (N, H, W, 3) uint8

    @staticmethod
    def build(n: int, seed: int, size: int, progress: bool = True) -> WorldImages:
        """Render the ``n`` scenes, in parallel over the cores this process may use (each image has its
        own seed, so the result does not depend on the number of workers)."""
        specs = split_specs("train", n, seed=seed)
        jobs = [(s, derive_seed(seed, i), size) for i, s in enumerate(specs)]
        workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 16)
        bar = tqdm(total=n, desc="render", disable=not progress, leave=False)
        out = []
        with ExitStack() as stack:
            if workers > 1 and n >= 2000:
                # spawn, not fork: the parent may already hold CUDA and torch threads
                pool = stack.enter_context(ProcessPoolExecutor(workers,
                                                               mp_context=multiprocessing.get_context("spawn")))
                images = pool.map(_render_job, jobs, chunksize=256)
            else:
                images = map(_render_job, jobs)
            for im in images:
                out.append(im)
                bar.update()
        bar.close()
        return WorldImages(specs, np.stack(out))


def _render_job(job: tuple[SceneSpec, int, int]) -> np.ndarray:
    spec, seed, size = job
    return render(spec, seed=seed, size=size)


def prompt_for(spec: SceneSpec, index: int, epoch: int, seed: int) -> str:
    """The training prompt of sample ``index`` in ``epoch``: a paraphrase picked deterministically, so
    a resumed run sees exactly the prompts an uninterrupted one would."""
    return paraphrase(spec, random.Random(hash((seed, epoch, index)) & 0xFFFFFFFF))


def save_tensor_atomic(obj: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path, obj, "data cache")
