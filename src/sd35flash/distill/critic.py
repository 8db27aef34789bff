"""The critic: the fake velocity model and the discriminator heads on its features, as one module.

Everything the critic step trains sits behind one ``forward`` (like ``FlowModel`` in pretraining),
so a DDP wrapper sees every trained parameter in one call and averages its gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..sampling import PromptEmbeds, predict_velocity
from .adversarial import Discriminator, FeatureTap, resolve_blocks
from .config import GANConfig


class Critic(torch.nn.Module):
    """``forward(x, t, cond, features)`` returns ``(v_fake, logits)``: the fake velocity and, when
    ``features`` is true and the GAN is on, one logit tensor per discriminator head."""

    def __init__(self, fake: torch.nn.Module, gan: GANConfig) -> None:
        super().__init__()
        self.fake = fake
        self.gan_enabled = gan.enabled
        self.backbone_weight = gan.backbone_weight if gan.backbone_grad else 0.0
        if gan.enabled:
            blocks = resolve_blocks(gan.blocks, len(fake.transformer_blocks))
            dim = int(fake.config.num_attention_heads * fake.config.attention_head_dim)
            self.disc = Discriminator(dim, len(blocks), gan.head_channels, gan.head, gan.pool)
            self._tap = (FeatureTap(fake, blocks),)  # a tuple keeps it out of the module tree

    @property
    def tap(self) -> FeatureTap:
        return self._tap[0]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds,
                features: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        want = features and self.gan_enabled
        if self.gan_enabled:
            self.tap.active = want
        try:
            v = predict_velocity(self.fake, x, t, cond)
        finally:
            if self.gan_enabled:
                self.tap.active = False
        if not want:
            return v, []
        feats = self.tap.take()
        return v, self.disc([scale_grad(f, self.backbone_weight) for f in feats])


def scale_grad(x: torch.Tensor, w: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient scaled by ``w`` in the backward (``w = 0``: detached)."""
    if w == 0.0:
        return x.detach()
    if w == 1.0:
        return x
    return w * x + (1.0 - w) * x.detach()


def split_logits(logits: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[list[torch.Tensor]]:
    """Split each head's logits along the batch into parts of ``sizes`` -> one list of heads per part."""
    parts = [torch.split(lg, list(sizes)) for lg in logits]
    return [[p[k] for p in parts] for k in range(len(sizes))]
