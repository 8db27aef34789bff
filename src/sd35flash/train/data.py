"""Data position that survives a resume: a seeded epoch-permutation sampler."""

from __future__ import annotations

import torch

from ..seeds import EPOCH_STRIDE, derive_seed


class EpochSampler:
    """Yields global batches of indices from per-epoch permutations of ``range(n)``.

    The permutation of epoch ``e`` is ``randperm(n, seed + e)``: identical on every process, so each
    process takes its own slice of the same global batch, and 1 process with global batch B sees
    exactly the samples 2 processes with B/2 each see together. Its ``state_dict`` (epoch, position)
    is checkpointed, so a resumed run continues with the very next sample.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        if n <= 0:
            raise ValueError("EpochSampler needs at least one sample")
        self.n = n
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._perm = self._make_perm()

    def _make_perm(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, EPOCH_STRIDE))
        return torch.randperm(self.n, generator=g)

    def next_global(self, batch: int) -> torch.Tensor:
        out = []
        need = batch
        while need > 0:
            take = min(need, self.n - self.pos)
            out.append(self._perm[self.pos : self.pos + take])
            self.pos += take
            need -= take
            if self.pos >= self.n:
                self.epoch += 1
                self.pos = 0
                self._perm = self._make_perm()
        return torch.cat(out)

    def next_local(self, global_batch: int, rank: int, world: int) -> torch.Tensor:
        """This process's slice of the next global batch (``global_batch`` must divide by ``world``)."""
        idx = self.next_global(global_batch)
        per = global_batch // world
        return idx[rank * per : (rank + 1) * per]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.n = int(state["seed"]), int(state["n"])
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._make_perm()
