"""The GAN's real side: latents with their prompts.

* ``teacher``: the teacher's many-step CFG samples (the end points of the cached trajectory bank);
* ``renders``: shapes-world renders of the training specs, encoded by the teacher's VAE. They are
  rendered and encoded lazily, a drawn batch at a time, and cached (on the CPU), so a bank over every
  training spec costs only what training draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UserError
from ..models.latents import encode_latents
from ..world import render
from ..world.spec import SceneSpec
from .prompts import PromptSource
from .trajectory import TrajectoryBank


@dataclass
class RealBank:
    latents: torch.Tensor  # (M, C, H, W), scaled latents
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """The latents of rows ``idx``."""
        return self.latents[idx]


@dataclass
class RenderBank:
    """``prompts[m]`` with the scaled VAE latent of ``render(specs[m], seed + m)``, encoded on first use."""

    vae: torch.nn.Module
    specs: list[SceneSpec]
    prompts: list[str]
    image_size: int
    seed: int
    cache: dict[int, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def image(self, m: int) -> np.ndarray:
        """The render of row ``m`` (uint8 HxWx3)."""
        return render(self.specs[m], seed=self.seed + m, size=self.image_size)

    @torch.no_grad()
    def take(self, idx: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The latents of rows ``idx``: the rows not cached yet are rendered and encoded in one batch."""
        rows = [int(i) for i in idx]
        missing = sorted({m for m in rows if m not in self.cache})
        if missing:
            device = next(self.vae.parameters()).device
            z = encode_latents(self.vae, np.stack([self.image(m) for m in missing]), progress=False, device=device)
            self.cache.update({m: z[j] for j, m in enumerate(missing)})
        return torch.stack([self.cache[m] for m in rows])


def from_teacher(bank: TrajectoryBank) -> RealBank:
    return RealBank(bank.samples.clone(), list(bank.prompts))


def from_renders(vae, source: PromptSource, n: int, image_size: int, seed: int = 7_000_000) -> RenderBank:
    """A lazy bank of the first ``n`` scenes of a shapes prompt source (``n = 0``: all of them)."""
    if source.specs is None:
        raise UserError("gan.real 'renders' needs --prompts shapes (a prompt file has no scenes to render); "
                        "use gan.real: teacher")
    n = n or len(source)
    specs = [source.specs[i % len(source)] for i in range(n)]
    prompts = [source.prompts[i % len(source)] for i in range(n)]
    return RenderBank(vae, specs, prompts, image_size, seed)
