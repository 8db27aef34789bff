"""The conv discriminator head can see a global shift of feature channels (its GroupNorm is no instance norm)."""

from __future__ import annotations

import torch

from sd35flash.distill.adversarial import Discriminator, hinge_d_loss, norm_groups


def test_norm_groups_keep_several_channels_per_group():
    assert [norm_groups(c) for c in (4, 8, 32, 64, 128, 256)] == [1, 2, 8, 16, 32, 32]
    for c in (3, 4, 6, 8, 10, 12, 32, 48, 50, 64, 72, 100, 128):  # GroupNorm needs groups dividing channels
        g = norm_groups(c)
        assert c % g == 0 and (c // g >= 4 or g == 1)


def _batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    real = torch.randn(16, 64, 16, generator=g)
    fake = torch.randn(16, 64, 16, generator=g)
    fake[..., :4] += 0.5  # fake differs only by a constant on 4 channels, the same on every token
    return real, fake


def test_a_32_channel_conv_head_learns_a_global_channel_shift():
    torch.manual_seed(0)
    disc = Discriminator(16, 1, 32, "conv")
    opt = torch.optim.AdamW(disc.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        real, fake = _batch(g)
        loss = hinge_d_loss(disc([real]), disc([fake]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        real, fake = _batch(g)
        lr_, lf_ = disc([real])[0], disc([fake])[0]
    assert (lr_.mean() - lf_.mean()).item() > 0.5
    assert hinge_d_loss([lr_], [lf_]).item() < 1.5  # chance is 2.0
