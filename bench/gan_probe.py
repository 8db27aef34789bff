"""Why the discriminator does not learn: two measurements on a teacher snapshot (docs/RESULTS.md,
"Why the discriminator did not learn").

1. Feature scale: the last block's image tokens on teacher samples noised to tau, how much of their
   energy is common to every sample (``common_frac``) or a per-channel constant (``channel_const_frac``),
   and how much the fresh head's mean logit varies between samples.
2. Head learnability: the snapshot (frozen, the fake model as stage 1 starts) on teacher samples (real)
   and a student's 4-step samples (fake); a fresh conv head per variant ``lr:channels:groups`` trained
   with hinge loss for 80 Adam steps (16 + 16 of 48 prompts, tau cycling 0.3/0.6/0.9), then its logit gap
   and D loss on the 16 held-out prompts. One seed.

usage: python bench/gan_probe.py SNAPSHOT TRAJECTORY_BANK.pt STUDENT_PIPELINE [lr:ch:groups ...]
"""

from __future__ import annotations

import sys

import torch

from sd35flash import flow
from sd35flash.distill.adversarial import Discriminator, FeatureTap, hinge_d_loss
from sd35flash.models.pipeline_io import load_pipeline
from sd35flash.sampling import PromptEmbeds, encode_prompts, predict_velocity

TAUS = (0.3, 0.6, 0.9)


def main(snapshot: str, bank: str, student: str, variants: list[str]) -> None:
    torch.manual_seed(0)
    pipe = load_pipeline(snapshot)
    tr = pipe.transformer.float().eval()
    stu = load_pipeline(student).transformer.float().eval()
    blob = torch.load(bank, weights_only=True)
    x0r = blob["states"][:, -1].float()
    prompts = list(blob["prompts"])
    n = len(prompts)
    with torch.no_grad():
        cond = encode_prompts(pipe, prompts)
        x, ts = torch.randn_like(x0r), [1.0, 0.8182, 0.6, 0.3333, 0.0]
        for a, b in zip(ts, ts[1:]):
            x = x + (b - a) * predict_velocity(stu, x, torch.full((n,), a), cond)
    x0f = x
    tap = FeatureTap(tr, [len(tr.transformer_blocks) - 1])
    g = torch.Generator().manual_seed(1)

    def feats(x0: torch.Tensor, tau: float, c: PromptEmbeds = cond) -> torch.Tensor:
        t = torch.full((x0.shape[0],), tau)
        xt = flow.interpolate(x0, torch.randn(x0.shape, generator=g), t)
        with torch.no_grad():
            tap.active = True
            predict_velocity(tr, xt, t, c)
            tap.active = False
        return tap.take()[0]

    fr = {t: feats(x0r, t) for t in TAUS}
    ff = {t: feats(x0f, t) for t in TAUS}
    dim = fr[TAUS[0]].shape[-1]
    heads = {}
    for groups in (32, 8):  # one channel per group (instance norm) and four
        torch.manual_seed(0)
        heads[groups] = Discriminator(dim, 1, 32, "conv")
        heads[groups].heads[0].net[1] = torch.nn.GroupNorm(groups, 32)
    for t in TAUS:
        f = fr[t]
        energy = f.pow(2).mean()
        with torch.no_grad():
            lgs = {k: h([f])[0] for k, h in heads.items()}
        print(f"feature scale tau {t}: rms {energy.sqrt():.3f}, max |f| {f.abs().max():.2f}, "
              f"common_frac {f.mean(0).pow(2).mean() / energy:.3f}, "
              f"channel_const_frac {f.mean((0, 1)).pow(2).mean() / energy:.3f}, "
              f"real-fake mean difference / energy {(f.mean(0) - ff[t].mean(0)).pow(2).mean() / energy:.2e}"
              + "".join(f"; fresh 32-channel head, {k} groups: mean logit std over samples {lg.mean(1).std():.4f}, "
                        f"over cells {lg.std(1).mean():.3f}" for k, lg in lgs.items()))
    for v in variants:
        lr, ch, groups = float(v.split(":")[0]), int(v.split(":")[1]), int(v.split(":")[2])
        torch.manual_seed(0)
        disc = Discriminator(dim, 1, ch, "conv")
        disc.heads[0].net[1] = torch.nn.GroupNorm(groups, ch)
        opt = torch.optim.AdamW(disc.parameters(), lr=lr, weight_decay=0.0)
        norms = []
        for s in range(80):
            t = TAUS[s % 3]
            idx = torch.randperm(48)[:16]
            loss = hinge_d_loss(disc([fr[t][idx]]), disc([ff[t][idx]]))
            opt.zero_grad()
            loss.backward()
            if s < 3:
                norms.append(torch.nn.utils.clip_grad_norm_(disc.parameters(), 1e9).item())
            opt.step()
        res = []
        with torch.no_grad():
            for t in TAUS:
                a, b = disc([fr[t][48:]])[0], disc([ff[t][48:]])[0]
                gap, loss = (a.mean() - b.mean()).item(), hinge_d_loss([a], [b]).item()
                res.append(f"tau {t}: gap {gap:+.3f} D loss {loss:.3f}")
        print(f"head lr {lr:g} channels {ch} groups {groups}: grad norm of steps 1-3 "
              f"{', '.join(f'{x:.3f}' for x in norms)}; held out: {'; '.join(res)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
