"""Stage C of pretraining: fine-tune the VAE's decoder for sharper, halo-free images.

The VAE stage weights foreground pixels ``1 + fg_weight`` times the background, so small shapes
survive the 4x downsampling; the price is the background next to a shape, which it under-weights:
decoded shapes sit in dark halos with ringing along their edges, and the Frechet distance of plain
VAE round trips is most of a teacher's (``bench/vae_fd.py``). This stage trains only the decoder
(``decoder``, and ``post_quant_conv`` where the VAE has one) with uniform pixel weights and an edge
term. The encoder is frozen, so the latents, and any flow model trained on them, stay valid: it can
run after the flow stage, or on a finished teacher's VAE.

The stage measures reconstruction PSNR and FD (EfficientNet-Lite0, ``val`` renders) of the decoder
before and after, and keeps the fine-tuned decoder only when its FD is lower.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import torch
from diffusers import AutoencoderKL

from ..io import atomic_write_text, staged_dir
from ..models.latents import images_to_tensor
from ..seeds import derive_seed
from ..train.alarms import check_finite
from ..train.checkpoint import CheckpointManager
from ..train.data import EpochSampler
from ..train.logger import RunLogger
from ..train.schedules import warmup_cosine
from ..train.stopping import checkpoint_step
from ..world import render, split_specs
from .data import WorldImages
from .vae_trainer import AutoencoderStage, roundtrip


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical finite differences of a (B, C, H, W) batch."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


class DecoderWithLoss(torch.nn.Module):
    """The decoder and its loss in one ``forward`` (so DDP sees the forward); the encoder is frozen."""

    def __init__(self, vae: AutoencoderKL, l1_weight: float, grad_weight: float, latent_noise: float) -> None:
        super().__init__()
        self.vae = vae
        vae.requires_grad_(True)
        for frozen in (vae.encoder, vae.quant_conv):  # SD3's VAE has no quant_conv
            if frozen is not None:
                frozen.requires_grad_(False)
        self.l1_weight, self.grad_weight, self.latent_noise = l1_weight, grad_weight, latent_noise

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``L = mean((x_rec - x)^2) + l1_weight * mean|x_rec - x| + grad_weight * mean|grad x_rec - grad x|``
        with ``x_rec = D(mu(x) + latent_noise * std(mu) * eps)``: uniform pixel weights, the edge term
        on finite differences, and optional latent noise so the decoder tolerates the small errors of
        generated latents."""
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.mean
            if self.latent_noise > 0:
                z = z + self.latent_noise * z.std() * torch.randn_like(z)
        rec = self.vae.decode(z).sample.float()
        mse = ((rec - x) ** 2).mean()
        l1 = (rec - x).abs().mean()
        gx, gy = image_gradients(rec)
        tx, ty = image_gradients(x)
        edge = 0.5 * ((gx - tx).abs().mean() + (gy - ty).abs().mean())
        loss = mse + self.l1_weight * l1 + self.grad_weight * edge
        return loss, {"decoder/mse": mse.detach(), "decoder/l1": l1.detach(), "decoder/edge": edge.detach()}


def reconstruction_quality(vae: AutoencoderKL, n: int, seed: int, size: int, scorer=None) -> dict:
    """PSNR of round trips of ``n`` ``val`` renders, and the FD of those round trips against renders of
    the same specs with other seeds, next to the FD of the originals (the floor)."""
    from ..evaluate.fd import FDScorer

    specs = split_specs("val", n, seed=seed)
    refs = np.stack([render(s, seed=derive_seed(seed, i, stride=7919), size=size) for i, s in enumerate(specs)])
    other = np.stack([render(s, seed=derive_seed(seed + 1, i, stride=7919), size=size) for i, s in enumerate(specs)])
    rec = roundtrip(vae, other)
    mse = float(((rec.astype(np.float64) - other.astype(np.float64)) ** 2).mean())
    scorer = scorer or FDScorer()
    ref_feats = scorer.features(refs)
    return {"psnr": 10 * math.log10(255.0**2 / max(mse, 1e-12)),
            "fd_reconstructions": float(scorer.fd_from_features(ref_feats, scorer.features(rec))),
            "fd_floor": float(scorer.fd_from_features(ref_feats, scorer.features(other))), "num_images": n}


class DecoderTrainer(AutoencoderStage):
    """Fine-tunes the decoder of a trained VAE (``cfg.decoder``); checkpoints and resumes like the VAE
    stage; writes ``work/decoder/final`` (the whole VAE) and ``work/decoder/metrics.json``."""

    folder = "decoder"

    def run(self, vae: AutoencoderKL) -> AutoencoderKL:
        """Return the VAE with the fine-tuned decoder, or ``vae`` itself where fine-tuning did not lower
        the reconstruction FD. ``vae`` is not modified."""
        if self.done():
            return self.load_final()
        cfg, acc, dc = self.cfg, self.acc, self.cfg.decoder
        data = WorldImages.build(dc.num_images, seed=cfg.data_seed + 3, size=cfg.model.image_size,
                                 progress=self.progress and acc.is_main_process)
        model = DecoderWithLoss(copy.deepcopy(vae).float().train(), dc.l1_weight, dc.grad_weight, dc.latent_noise)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=dc.lr, weight_decay=0.0)
        sched = warmup_cosine(opt, dc.warmup, dc.steps, 0.05)
        pmodel, opt, sched = acc.prepare(model, opt, sched)
        sampler = EpochSampler(len(data.specs), seed=cfg.data_seed + 13)
        acc.register_for_checkpointing(sampler)
        ckpt = CheckpointManager(self.dir)
        step = ckpt.load(acc)
        log = RunLogger(acc, self.dir, "decoder", total=dc.steps, start=step, desc="decoder", progress=self.progress)
        while step < dc.steps:
            idx = sampler.next_local(dc.batch_size, acc.process_index, acc.num_processes)
            x = images_to_tensor(data.images[idx.numpy()]).to(acc.device)
            with acc.autocast():
                loss, parts = pmodel(x)
            acc.backward(loss)
            gn = acc.clip_grad_norm_(params, 1.0)
            check_finite(step, **{"decoder loss": loss, "decoder grad norm": gn})
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            log.advance()
            if step % 25 == 0 or step == dc.steps:
                log.scalars(step, {"decoder/loss": loss.item(), **{k: v.item() for k, v in parts.items()},
                                   "decoder/lr": sched.get_last_lr()[0]})
            checkpoint_step(acc, ckpt, step, dc.steps, dc.checkpoint_every)
        tuned = acc.unwrap_model(pmodel).vae.eval()
        if acc.is_main_process:
            from ..evaluate.fd import FDScorer

            scorer = FDScorer()
            q = dict(seed=cfg.data_seed + 17, size=cfg.model.image_size, scorer=scorer)
            before = reconstruction_quality(vae.eval(), dc.eval_images, **q)
            after = reconstruction_quality(tuned, dc.eval_images, **q)
            kept = after["fd_reconstructions"] < before["fd_reconstructions"]
            chosen = tuned if kept else vae
            with staged_dir(self.final_dir, "VAE folder") as tmp:
                chosen.save_pretrained(tmp)
            metrics = {"before": before, "after": after, "kept": kept, "steps": dc.steps}
            atomic_write_text(self.dir / "metrics.json", json.dumps(metrics, indent=1), "decoder metrics")
            log.write(f"decoder fine-tune: PSNR {before['psnr']:.2f} -> {after['psnr']:.2f} dB, reconstruction "
                      f"FD {before['fd_reconstructions']:.1f} -> {after['fd_reconstructions']:.1f} (renders "
                      f"{before['fd_floor']:.1f}); {'kept' if kept else 'not kept: the original decoder stays'}")
        log.close(end_training=False)
        acc.wait_for_everyone()
        acc.free_memory()
        acc._custom_objects.clear()
        return self.load_final()
