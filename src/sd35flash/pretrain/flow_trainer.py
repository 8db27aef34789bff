"""Stage B of pretraining: the SD3 transformer (with the tiny text encoders) by rectified flow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, StableDiffusion3Pipeline
from diffusers.training_utils import EMAModel

from .. import flow
from ..errors import ConfigError, UserError
from ..imaging import make_grid, save_png
from ..models.latents import encode_latents
from ..models.toy import build_scheduler, build_text_encoders, build_transformer
from ..sampling import (
    PromptEmbeds,
    clip_length,
    drop_encoders,
    encode_prompts,
    generate,
    predict_velocity,
    scheduler_schedule,
)
from ..toy_teacher import PretrainConfig
from ..train.checkpoint import CheckpointManager
from ..train.data import EpochSampler
from ..train.ema import EMAHook
from ..train.logger import RunLogger
from ..train.loop import CheckpointHook, PeriodicHook, Stage, TrainLoop, Update
from ..train.schedules import warmup_cosine
from ..world import CATEGORIES, all_words, canonical_prompt, judge, split_specs
from ..world.spec import SceneSpec
from .data import WorldImages, prompt_for, save_tensor_atomic

SAMPLE_PROMPTS = (
    "a large red circle", "a small green square", "a blue triangle", "a white diamond",
    "a yellow square on the left", "a red circle and a blue square", "a green triangle above a cyan circle",
    "three orange squares",
)


class FlowModel(torch.nn.Module):
    """Everything the teacher trains: transformer + text encoders. ``forward`` encodes prompts (with
    independent encoder dropout) and predicts the velocity, so one DDP-wrapped forward covers all
    trained weights."""

    def __init__(self, pipe: StableDiffusion3Pipeline, train_text_encoders: bool) -> None:
        super().__init__()
        self.transformer = pipe.transformer
        self.text_encoder = pipe.text_encoder
        self.text_encoder_2 = pipe.text_encoder_2
        self.text_encoder_3 = pipe.text_encoder_3
        self.train_text_encoders = train_text_encoders
        self._pipe = (pipe,)  # a tuple keeps the pipeline out of the module tree
        for enc in (self.text_encoder, self.text_encoder_2, self.text_encoder_3):
            enc.requires_grad_(train_text_encoders)

    @property
    def pipe(self) -> StableDiffusion3Pipeline:
        return self._pipe[0]

    def encode(self, prompts: list[str], drop_clip: torch.Tensor, drop_t5: torch.Tensor) -> PromptEmbeds:
        with torch.set_grad_enabled(self.train_text_encoders and torch.is_grad_enabled()):
            pe = encode_prompts(self.pipe, prompts, device=drop_clip.device)
        return drop_encoders(pe, clip_length(self.pipe), drop_clip, drop_t5)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, prompts: list[str], drop_clip: torch.Tensor,
                drop_t5: torch.Tensor) -> torch.Tensor:
        cond = self.encode(prompts, drop_clip, drop_t5)
        return predict_velocity(self.transformer, x_t, t, cond.to(dtype=x_t.dtype))


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``L = E_t || v_theta(x_t, t, c) - (eps - x0) ||^2`` with ``x_t = (1 - t) x0 + t eps``."""
    return F.mse_loss(v_pred.float(), flow.target_velocity(x0, eps).float())


def build_teacher_pipeline(cfg: PretrainConfig, vae: AutoencoderKL) -> StableDiffusion3Pipeline:
    enc = build_text_encoders(cfg.model, all_words())
    return StableDiffusion3Pipeline(transformer=build_transformer(cfg.model), vae=vae,
                                    scheduler=build_scheduler(cfg.model), **enc)


#: The parts the flow stage trains (the VAE is frozen, the scheduler has no weights).
TRAINED_PARTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def copy_trained_weights(src: StableDiffusion3Pipeline, dst: StableDiffusion3Pipeline, name: str | None) -> None:
    """Load ``src``'s transformer and text encoders into ``dst``'s (built from the config), strictly:
    a part that is missing or has other shapes is a :class:`ConfigError` naming it."""
    for part in TRAINED_PARTS:
        a, b = getattr(src, part, None), getattr(dst, part)
        if a is None:
            raise ConfigError(f"init: {name} has no {part}; pass a teacher trained by `sd35flash pretrain`")
        try:
            b.load_state_dict(a.state_dict(), strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(f"init: the {part} of {name} does not match this config's model section "
                              f"({first}); use the model section it was trained with") from None
    for tok in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        a, b = getattr(src, tok, None), getattr(dst, tok)
        if a is None or a.get_vocab() != b.get_vocab():
            raise ConfigError(f"init: the {tok} of {name} has another vocabulary; it cannot be continued")


class FlowTrainer:
    """Rectified-flow training on :class:`~sd35flash.train.loop.TrainLoop`: one stage whose update is
    the flow-matching loss; the EMA, sample grids, the judged probe and checkpoints are hooks.

    Checkpoint layout (kept so that runs in progress resume): the prepared model (transformer + text
    encoders), optimiser and LR schedule, then the registered EMA and epoch sampler."""

    def __init__(self, cfg: PretrainConfig, work_dir: Path, accelerator: Accelerator, progress: bool = True,
                 stop_at: int | None = None) -> None:
        self.cfg = cfg
        self.stop_at = stop_at
        self.work = Path(work_dir)
        self.dir = self.work / "flow"
        self.acc = accelerator
        self.progress = progress

    # -- data ---------------------------------------------------------------------------------
    def latents(self, vae: AutoencoderKL) -> tuple[torch.Tensor, list[SceneSpec]]:
        path = self.work / "latents.pt"
        if self.acc.is_main_process and not path.is_file():
            data = WorldImages.build(self.cfg.flow.num_images, seed=self.cfg.data_seed + 2,
                                     size=self.cfg.model.image_size, progress=self.progress)
            lat = encode_latents(vae, data.images, progress=self.progress)
            save_tensor_atomic({"latents": lat.half(), "specs": [s.to_dict() for s in data.specs]}, path)
        self.acc.wait_for_everyone()
        blob = torch.load(path, weights_only=True)
        return blob["latents"].float(), [SceneSpec.from_dict(d) for d in blob["specs"]]

    # -- one step -------------------------------------------------------------------------------
    def batch(self, latents: torch.Tensor, specs: list[SceneSpec], idx: torch.Tensor, epoch: int):
        fc = self.cfg.flow
        n = len(idx)
        dev = self.acc.device
        x0 = latents[idx].to(dev)
        prompts = [prompt_for(specs[i], int(i), epoch, self.cfg.data_seed) for i in idx.tolist()]
        drop_prompt = torch.rand(n) < fc.prompt_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop_prompt.tolist())]
        drop_clip = (torch.rand(n) < fc.clip_dropout).to(dev)
        drop_t5 = (torch.rand(n) < fc.t5_dropout).to(dev)
        t = flow.sample_logit_normal(n, fc.logit_mean, fc.logit_std, fc.shift, device=dev)
        eps = torch.randn(x0.shape).to(dev)
        return x0, eps, t, prompts, drop_clip, drop_t5

    # -- main loop ------------------------------------------------------------------------------
    def run(self, vae: AutoencoderKL, init: StableDiffusion3Pipeline | None = None) -> StableDiffusion3Pipeline:
        """Train and return the pipeline (EMA weights). ``init`` (``cfg.init`` loaded) gives the starting
        transformer and text encoders; a resumed run then overwrites them from its checkpoint."""
        cfg, fc, acc = self.cfg, self.cfg.flow, self.acc
        latents, specs = self.latents(vae)
        pipe = build_teacher_pipeline(cfg, vae)
        if init is not None:
            copy_trained_weights(init, pipe, cfg.init)
        pipe.vae.requires_grad_(False)
        model = FlowModel(pipe, fc.train_text_encoders)
        groups = [{"params": list(model.transformer.parameters()), "lr": fc.lr}]
        if fc.train_text_encoders:
            enc_params = [p for n, p in model.named_parameters() if not n.startswith("transformer.")]
            groups.append({"params": enc_params, "lr": fc.text_encoder_lr})
        opt = torch.optim.AdamW(groups, weight_decay=fc.weight_decay, betas=(0.9, 0.99))
        sched = warmup_cosine(opt, fc.warmup, fc.steps, fc.min_lr_ratio)
        ema = EMAModel(model.parameters(), decay=fc.ema_decay)
        sampler = EpochSampler(len(specs), seed=cfg.data_seed + 12)
        pmodel, opt, sched = acc.prepare(model, opt, sched)
        pipe.to(acc.device)
        acc.register_for_checkpointing(ema, sampler)
        ckpt = CheckpointManager(self.dir)
        step = ckpt.load(acc)
        if self.stop_at is not None and not step < self.stop_at < fc.steps:
            raise UserError(f"--stop-at {self.stop_at} must lie after the run's step {step} and before its last "
                            f"step {fc.steps}")
        ema.to(acc.device)
        n_params = sum(p.numel() for p in model.transformer.parameters()) / 1e6
        log = RunLogger(acc, self.dir, "flow", total=fc.steps, start=step, desc="teacher", progress=self.progress)
        log.write(f"teacher: {n_params:.2f}M transformer parameters, {len(specs)} training scenes"
                  + (f", resuming at step {step}" if step else ""))
        pmodel.train()

        def loss(micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            """``L_flow`` on the sampler's next batch."""
            epoch = sampler.epoch
            idx = sampler.next_local(fc.batch_size, acc.process_index, acc.num_processes)
            x0, eps, t, prompts, drop_clip, drop_t5 = self.batch(latents, specs, idx, epoch)
            x_t = flow.interpolate(x0, eps, t)
            with acc.autocast():
                v = pmodel(x_t, t, prompts, drop_clip, drop_t5)
            value = flow_matching_loss(v, x0, eps)
            return value, {"flow/loss": value.detach()}

        update = Update(loss, opt, pmodel, fc.grad_clip, "flow/grad_norm", "flow/loss", scheduler=sched,
                        lr_key="flow/lr")
        hooks = [EMAHook(ema, model.parameters),
                 PeriodicHook(fc.sample_every,
                              lambda s, lg: self.with_ema(ema, model, lambda: self.sample_grid(pipe, s, lg))),
                 PeriodicHook(fc.probe_every, lambda s, lg: self.with_ema(ema, model, lambda: self.probe(pipe, s, lg))),
                 CheckpointHook(acc, ckpt, fc.checkpoint_every, self.stop_at)]
        loop = TrainLoop(acc, [Stage("flow", fc.steps, lambda s: [update])], hooks, log_every=25)
        try:
            loop.run(step, log)
        finally:
            log.close(end_training=False)
        ema.copy_to(model.parameters())
        pipe.to("cpu")
        acc.free_memory()
        acc._custom_objects.clear()
        return pipe

    def with_ema(self, ema: EMAModel, model: torch.nn.Module, fn) -> None:
        """Run ``fn`` on the main process with the EMA weights swapped in."""
        if self.acc.is_main_process:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
            model.eval()
            try:
                fn()
            finally:
                ema.restore(model.parameters())
                model.train()
        self.acc.wait_for_everyone()

    def sample_grid(self, pipe: StableDiffusion3Pipeline, step: int, log: RunLogger) -> None:
        fc = self.cfg.flow
        sched = scheduler_schedule(pipe, 28)
        imgs = generate(pipe, list(SAMPLE_PROMPTS), list(range(len(SAMPLE_PROMPTS))), sched, guidance=fc.probe_guidance)
        grid = make_grid(imgs, cols=4, scale=2, captions=list(SAMPLE_PROMPTS))
        save_png(self.dir / "samples" / f"step{step:07d}.png", grid)
        log.image(step, "samples", grid)

    def probe(self, pipe: StableDiffusion3Pipeline, step: int, log: RunLogger) -> None:
        """Judge a small fixed ``val`` probe set: alignment per category, logged as ``probe/*``."""
        fc = self.cfg.flow
        specs = split_specs("val", fc.probe_images, seed=self.cfg.data_seed + 99)
        prompts = [canonical_prompt(s) for s in specs]
        sched = scheduler_schedule(pipe, fc.probe_steps)
        imgs = generate(pipe, prompts, list(range(len(specs))), sched, guidance=fc.probe_guidance)
        ok = [judge(im, s).correct for im, s in zip(imgs, specs)]
        vals = {"probe/overall": float(np.mean(ok)), "probe/pixel_std": float(imgs.std())}
        for c in CATEGORIES:
            sel = [o for o, s in zip(ok, specs) if s.category == c]
            if sel:
                vals[f"probe/{c}"] = float(np.mean(sel))
        log.scalars(step, vals, show=False)
        log.write(f"step {step}: probe alignment {vals['probe/overall']:.3f} "
                  + " ".join(f"{c}={vals.get('probe/' + c, float('nan')):.2f}" for c in CATEGORIES))
