"""The GAN's real side: latents with their prompts.

* ``teacher``: the teacher's many-step CFG samples (the end points of the cached trajectory bank);
* ``renders``: shapes-world renders of the training specs, encoded by the teacher's VAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..pretrain.data import encode_latents
from ..world import render
from .prompts import PromptSource
from .trajectory import TrajectoryBank


@dataclass
class RealBank:
    latents: torch.Tensor  # (M, C, H, W), scaled latents
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


def from_teacher(bank: TrajectoryBank) -> RealBank:
    return RealBank(bank.samples.clone(), list(bank.prompts))


def from_renders(vae, source: PromptSource, n: int, image_size: int, seed: int = 7_000_000) -> RealBank:
    """Render the first ``n`` scenes of a shapes prompt source and encode them with ``vae``."""
    if source.specs is None:
        raise UserError("gan.real 'renders' needs --prompts shapes (a prompt file has no scenes to render); "
                        "use gan.real: teacher")
    specs = [source.specs[i % len(source)] for i in range(n)]
    prompts = [source.prompts[i % len(source)] for i in range(n)]
    images = np.stack([render(s, seed=seed + i, size=image_size) for i, s in enumerate(specs)])
    device = next(vae.parameters()).device
    return RealBank(encode_latents(vae, images, progress=False, device=device), prompts)
