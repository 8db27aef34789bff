"""Per-step random draws that do not depend on the number of processes.

Every process draws the *global* batch from a generator seeded by ``(seed, step, stream)`` and
keeps its own slice, so one process with global batch B sees exactly the numbers that N processes
with B / N each see together, and a resumed run draws what an uninterrupted one would, whatever the
global RNG state.
"""

from __future__ import annotations

import torch

from ..seeds import derive_seed


class StepRandom:
    """Random tensors for one (step, stream): global draws, local slices."""

    def __init__(self, seed: int, step: int, stream: str, global_batch: int, rank: int = 0, world: int = 1) -> None:
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} does not divide by {world} processes")
        key = derive_seed(seed, step) * 131 + sum(ord(c) * 31**k for k, c in enumerate(stream)) % 1_000_000_007
        self.gen = torch.Generator("cpu").manual_seed(key % (2**63 - 1))
        self.batch = global_batch
        per = global_batch // world
        self.sl = slice(rank * per, (rank + 1) * per)

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal of shape (local batch, *shape)."""
        return torch.randn((self.batch, *shape), generator=self.gen)[self.sl]

    def rand(self) -> torch.Tensor:
        """Uniform [0, 1) of shape (local batch,)."""
        return torch.rand(self.batch, generator=self.gen)[self.sl]

    def randint(self, high: int) -> torch.Tensor:
        """Integers in [0, high) of shape (local batch,)."""
        return self.randint_global(high)[self.sl]

    def randint_global(self, high: int) -> torch.Tensor:
        """:meth:`randint`'s draw for the whole global batch (``[self.sl]`` is this process's part):
        what every process must agree on, e.g. how many rollout steps to run."""
        return torch.randint(0, high, (self.batch,), generator=self.gen)

    def scalar(self) -> float:
        """One uniform [0, 1) number, the same on every process."""
        return float(torch.rand((), generator=self.gen))
