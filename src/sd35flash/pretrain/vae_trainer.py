"""Stage A of pretraining: the tiny ``AutoencoderKL`` on shapes-world renders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

from ..errors import TrainingAlarm
from ..io import atomic_write_text, staged_dir
from ..models.latents import images_to_tensor
from ..models.toy import build_vae
from ..seeds import derive_seed
from ..toy_teacher import PretrainConfig
from ..train.alarms import check_finite
from ..train.checkpoint import CheckpointManager
from ..train.data import EpochSampler
from ..train.logger import RunLogger
from ..train.schedules import warmup_cosine
from ..train.stopping import checkpoint_step
from ..world import BACKGROUND, judge, render, split_specs
from .data import WorldImages


def foreground_weight(x: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """Per-pixel loss weight ``1 + fg_weight * [pixel differs from the background]`` (B, 1, H, W)."""
    bg = torch.tensor(BACKGROUND, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) / 127.5 - 1
    fg = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.1).to(x.dtype)
    return 1.0 + fg_weight * fg


class VAEWithLoss(torch.nn.Module):
    """Wraps the VAE so one ``forward`` returns its loss (DDP must see the forward to sync gradients)."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float, fg_weight: float) -> None:
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight
        self.fg_weight = fg_weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``L = mean(w * (x_rec - x)^2) + 0.5 * mean(w * |x_rec - x|) + kl_weight * KL(q(z|x) || N(0, I))``
        with the KL averaged per latent element. Returns (loss, mse, l1, kl)."""
        post = self.vae.encode(x).latent_dist
        z = post.sample()
        rec = self.vae.decode(z).sample.float()
        w = foreground_weight(x, self.fg_weight)
        mse = (w * (rec - x) ** 2).mean()
        l1 = (w * (rec - x).abs()).mean()
        kl = post.kl().mean() / float(np.prod(z.shape[1:]))
        return mse + 0.5 * l1 + self.kl_weight * kl, mse, l1, kl


class AutoencoderStage:
    """A pretraining stage that ends in a VAE folder: ``work/<folder>/`` holds its checkpoints, its
    result ``final/`` and ``metrics.json``; the stage is done when both exist."""

    folder = ""

    def __init__(self, cfg: PretrainConfig, work_dir: Path, accelerator: Accelerator, progress: bool = True) -> None:
        self.cfg = cfg
        self.dir = Path(work_dir) / self.folder
        self.final_dir = self.dir / "final"
        self.acc = accelerator
        self.progress = progress

    def done(self) -> bool:
        return (self.final_dir / "config.json").is_file() and (self.dir / "metrics.json").is_file()

    def load_final(self) -> AutoencoderKL:
        return AutoencoderKL.from_pretrained(self.final_dir)


class VAETrainer(AutoencoderStage):
    """Trains, checkpoints, resumes and finally calibrates the VAE (``scaling_factor``/``shift_factor``)."""

    folder = "vae"

    def run(self) -> AutoencoderKL:
        if self.done():
            return self.load_final()
        cfg, acc = self.cfg, self.acc
        vcfg = cfg.vae
        data = WorldImages.build(vcfg.num_images, seed=cfg.data_seed + 1, size=cfg.model.image_size,
                                 progress=self.progress and acc.is_main_process)
        vae = VAEWithLoss(build_vae(cfg.model), vcfg.kl_weight, vcfg.fg_weight)
        opt = torch.optim.AdamW(vae.parameters(), lr=vcfg.lr, weight_decay=0.0)
        sched = warmup_cosine(opt, vcfg.warmup, vcfg.steps, 0.05)
        vae, opt, sched = acc.prepare(vae, opt, sched)
        sampler = EpochSampler(len(data.specs), seed=cfg.data_seed + 11)
        acc.register_for_checkpointing(sampler)
        ckpt = CheckpointManager(self.dir)
        step = ckpt.load(acc)
        log = RunLogger(acc, self.dir, "vae", total=vcfg.steps, start=step, desc="VAE", progress=self.progress)
        images = data.images
        vae.train()
        while step < vcfg.steps:
            idx = sampler.next_local(vcfg.batch_size, acc.process_index, acc.num_processes)
            x = images_to_tensor(images[idx.numpy()]).to(acc.device)
            with acc.autocast():
                loss, mse, l1, kl = vae(x)
            parts = {"vae/mse": mse.item(), "vae/l1": l1.item(), "vae/kl": kl.item()}
            acc.backward(loss)
            gn = acc.clip_grad_norm_(vae.parameters(), 1.0)
            check_finite(step, **{"vae loss": loss, "vae grad norm": gn})
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            log.advance()
            if step % 25 == 0 or step == vcfg.steps:
                log.scalars(step, {"vae/loss": loss.item(), **parts, "vae/lr": sched.get_last_lr()[0]})
            checkpoint_step(acc, ckpt, step, vcfg.steps, vcfg.checkpoint_every)
        log.close(end_training=False)
        model = acc.unwrap_model(vae).vae
        model.eval()
        if acc.is_main_process:
            self._calibrate(model, images)
            metrics = evaluate_vae(model, vcfg.eval_images, seed=cfg.data_seed + 7, size=cfg.model.image_size)
            with staged_dir(self.final_dir, "VAE folder") as tmp:
                model.save_pretrained(tmp)
            atomic_write_text(self.dir / "metrics.json", json.dumps(metrics, indent=1), "VAE metrics")
        acc.wait_for_everyone()
        acc.free_memory()
        acc._custom_objects.clear()
        return self.load_final()

    @torch.no_grad()
    def _calibrate(self, vae: AutoencoderKL, images: np.ndarray, n: int = 2048) -> None:
        """Set ``shift_factor = mean(z)`` and ``scaling_factor = 1 / std(z)`` so scaled latents have unit
        variance, as SD3's VAE config does."""
        zs = []
        for i in range(0, min(n, len(images)), 256):
            x = images_to_tensor(images[i : i + 256]).to(vae.device, vae.dtype)
            zs.append(vae.encode(x).latent_dist.mean.float())
        z = torch.cat(zs)
        mean, std = z.mean().item(), z.std().item()
        if not math.isfinite(std) or std <= 0:
            raise TrainingAlarm("VAE latents collapsed (zero variance); retrain the VAE with a lower learning rate")
        vae.register_to_config(shift_factor=float(mean), scaling_factor=float(1.0 / std))


@torch.no_grad()
def roundtrip(vae: AutoencoderKL, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """uint8 (N, H, W, 3) -> decode(encoder mean), uint8."""
    out = []
    for i in range(0, len(images), batch):
        x = images_to_tensor(images[i : i + batch]).to(vae.device, vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        out.append(((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKL, n: int, seed: int, size: int) -> dict:
    """Reconstruction PSNR and judge accuracy on reconstructions of ``val`` renders (per category)."""
    specs = split_specs("val", n, seed=seed)
    imgs = np.stack([render(s, seed=derive_seed(seed, i, stride=7919), size=size) for i, s in enumerate(specs)])
    rec = roundtrip(vae, imgs)
    mse = ((rec.astype(np.float64) - imgs.astype(np.float64)) ** 2).mean()
    psnr = 10 * math.log10(255.0**2 / max(mse, 1e-12))
    per: dict[str, list[bool]] = {}
    for s, im in zip(specs, rec):
        per.setdefault(s.category, []).append(judge(im, s).correct)
    acc_cat = {k: float(np.mean(v)) for k, v in per.items()}
    return {"psnr": psnr, "judge_accuracy": float(np.mean([x for v in per.values() for x in v])),
            "judge_per_category": acc_cat, "num_images": n}
