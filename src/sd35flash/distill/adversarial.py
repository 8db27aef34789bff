"""Loss 2: a multi-head discriminator on the fake model's intermediate transformer features.

Forward hooks on chosen ``transformer_blocks`` record their image-token output (B, N, D); the
tokens are reshaped to the latent patch grid (B, D, h, w) and each hooked block gets a small head
that outputs logits (one per grid cell for ``conv``, per token for ``linear``). Hinge loss:

* discriminator: ``L_D = mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``;
* generator: ``L_G = -mean(D(fake))``.

or the non-saturating softplus loss, ``L_D = mean(softplus(-D(real))) + mean(softplus(D(fake)))`` and
``L_G = mean(softplus(-D(fake)))``. A pooled head averages its logits to one per sample.

Each head is re-initialised with probability ``p`` per step (NitroFusion's trick against
discriminator over-fitting), with its optimiser state cleared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..train.sharding import reset_as_whole


def resolve_blocks(indices: Sequence[int], n_blocks: int) -> list[int]:
    """Block indices, negatives counted from the end; out-of-range -> ValueError naming the range."""
    out = []
    for i in indices:
        j = i + n_blocks if i < 0 else i
        if not 0 <= j < n_blocks:
            raise ValueError(f"gan.blocks index {i} is outside the transformer's {n_blocks} blocks")
        out.append(j)
    return sorted(set(out))


class FeatureTap:
    """Forward hooks recording the image-token output of chosen SD3 transformer blocks.

    ``JointTransformerBlock`` returns ``(encoder_hidden_states, hidden_states)``; the tap keeps the
    second. It records only while ``active`` is true.
    """

    def __init__(self, transformer: torch.nn.Module, blocks: Sequence[int]) -> None:
        self.blocks = list(blocks)
        self.active = False
        self.features: dict[int, torch.Tensor] = {}
        self._handles = [transformer.transformer_blocks[b].register_forward_hook(self._hook(b)) for b in self.blocks]

    def _hook(self, b: int):
        def hook(module, args, output):
            if self.active:
                self.features[b] = output[1] if isinstance(output, tuple) else output
        return hook

    def take(self) -> list[torch.Tensor]:
        feats = [self.features[b] for b in self.blocks]
        self.features = {}
        return feats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, D) image tokens -> (B, D, h, w) on the square patch grid (``h = w = sqrt(N)``)."""
    b, n, d = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} image tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(b, d, side, side)


def norm_groups(channels: int) -> int:
    """GroupNorm groups of a conv head: at most 32, each of at least 4 channels where ``channels`` allows.

    One channel per group (instance norm) would remove each channel's per-sample mean and scale over
    the grid, the global statistics in which real and fake samples differ most; such a head stays blind.
    """
    return max(g for g in range(1, 33) if channels % g == 0 and (channels // g >= 4 or g == 1))


class DiscHead(torch.nn.Module):
    """``conv``: 3x3 conv -> GroupNorm (:func:`norm_groups`) -> SiLU -> 1x1 conv to one logit per cell;
    ``linear``: LayerNorm -> Linear -> SiLU -> Linear to one logit per token."""

    def __init__(self, dim: int, channels: int, kind: str, pool: bool = False) -> None:
        super().__init__()
        self.kind, self.pool = kind, pool
        if kind == "conv":
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(dim, channels, 3, padding=1), torch.nn.GroupNorm(norm_groups(channels), channels),
                torch.nn.SiLU(), torch.nn.Conv2d(channels, 1, 1))
        else:
            self.net = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, channels), torch.nn.SiLU(),
                                           torch.nn.Linear(channels, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, cells), or (B, 1) averaged over the cells when pooled."""
        if self.kind == "conv":
            out = self.net(tokens_to_grid(tokens.float())).flatten(1)
        else:
            out = self.net(tokens.float()).flatten(1)
        return out.mean(dim=1, keepdim=True) if self.pool else out

    def reset_parameters(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()


class Discriminator(torch.nn.Module):
    """One :class:`DiscHead` per hooked block; ``forward`` maps the block features to logits per head."""

    def __init__(self, dim: int, n_heads: int, channels: int, kind: str, pool: bool = False) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(DiscHead(dim, channels, kind, pool) for _ in range(n_heads))

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [h(f) for h, f in zip(self.heads, features)]


def hinge_d_loss(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """``L_D = mean_heads [mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))]``."""
    terms = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake)]
    return torch.stack(terms).mean()


def hinge_g_loss(fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """``L_G = -mean_heads mean(D(fake))``."""
    return -torch.stack([f.mean() for f in fake]).mean()


def softplus_d_loss(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """``L_D = mean_heads [mean(softplus(-D(real))) + mean(softplus(D(fake)))]`` (non-saturating)."""
    terms = [F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real, fake)]
    return torch.stack(terms).mean()


def softplus_g_loss(fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """``L_G = mean_heads mean(softplus(-D(fake)))`` (non-saturating)."""
    return torch.stack([F.softplus(-f).mean() for f in fake]).mean()


def d_loss(kind: str, real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """The discriminator loss of ``gan.loss`` (``hinge`` or ``softplus``)."""
    return softplus_d_loss(real, fake) if kind == "softplus" else hinge_d_loss(real, fake)


def g_loss(kind: str, fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """The generator loss of ``gan.loss`` (``hinge`` or ``softplus``)."""
    return softplus_g_loss(fake) if kind == "softplus" else hinge_g_loss(fake)


def reinit_draws(n_heads: int, mode: str, draw) -> list[float]:
    """Per-head draws for :func:`reinit_heads` from ``draw()`` (uniform [0, 1)): ``each``, one per
    head; ``one``, one draw decides whether, another which head (the others get 1.0, never)."""
    if mode == "each":
        return [draw() for _ in range(n_heads)]
    u, which = draw(), min(int(draw() * n_heads), n_heads - 1)
    return [u if h == which else 1.0 for h in range(n_heads)]


@torch.no_grad()
def reinit_heads(disc: Discriminator, optimizer: torch.optim.Optimizer, prob: float, draws: Sequence[float],
                 seed: int) -> list[int]:
    """Re-initialise head ``h`` when ``draws[h] < prob``, from a generator seeded by ``seed + h`` (so all
    processes agree), and clear its optimiser state. Returns the re-initialised head indices."""
    done = []
    inner = getattr(optimizer, "optimizer", optimizer)
    for h, (head, u) in enumerate(zip(disc.heads, draws)):
        if u >= prob:
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + h)
            reset_as_whole(head, head.reset_parameters)  # sharded heads draw what whole ones do
        for p in head.parameters():
            inner.state.pop(p, None)
        done.append(h)
    return done
