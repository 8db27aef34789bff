"""The staged distillation runner on accelerate.

A run is a list of :class:`Stage` objects executed back to back on one global step counter:
stage 0 trajectory guidance (:mod:`.trajectory`), stage 1 DMD + GAN (:mod:`.dmd`, :mod:`.fake`,
:mod:`.adversarial`), and (when ``split.steps > 0``) stage 2, split-timestep fine-tuning: K branch
copies of the stage-1 EMA student, each trained with the stage-1 generator loss on the student
steps of its own time range, the routed student (each step by its branch) feeding the critic.

Every trainable module (student; critic = fake + discriminator heads) and every optimiser is
prepared by accelerate; the student's EMA, the data samplers, the LR schedule and the collapse
detectors are registered for checkpointing, so a checkpoint resumes exactly. Random draws come
from :class:`.randomness.StepRandom`, so N processes reproduce one process with the same global
batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from .. import flow
from ..errors import UserError
from ..imaging import make_grid, save_png
from ..sampling import PromptEmbeds, generate, guided_velocity, predict_velocity
from ..train.alarms import CollapseDetector, check_finite
from ..train.checkpoint import CheckpointManager, StopTraining, read_meta, saved_models
from ..train.data import EpochSampler
from ..train.logger import RunLogger
from ..train.schedules import warmup_cosine
from ..world import canonical_prompt, judge, split_specs
from .adversarial import hinge_d_loss, hinge_g_loss, reinit_heads
from .config import DistillConfig
from .critic import Critic, split_logits
from .dmd import dmd_loss, evaluation_point, evaluation_times
from .fake import fake_flow_loss, fake_input
from ..models.branches import BranchRouter, branch_ranges
from .models import DistillModels, params_frozen, trainable_copy
from .prompts import PromptSource
from .randomness import StepRandom
from .real import RealBank
from .rollout import Student, rollout_to_step, student_sample, times_at
from .trajectory import TrajectoryBank, tg_loss

Metrics = dict[str, torch.Tensor]


@dataclass
class Stage:
    """One stage of the recipe: ``steps`` global steps, each running ``step(global_step)``.
    ``student_ema``: whether the student's EMA follows the student after each step (stage 2 trains
    the branches, which keep their own EMAs, and leaves the stage-1 student and its EMA as they are)."""

    name: str
    steps: int
    step: Callable[[int], Metrics]
    student_ema: bool = True


@dataclass
class Generator:
    """What one generator update trains: ``trained`` (the prepared module whose velocity at step
    ``i`` carries the gradient), ``rollout`` (the unwrapped student or branch router that runs steps
    ``1..i-1`` without gradients), the optimiser (and LR schedule), the student steps ``i`` it is
    trained on (``None``: all K) and the loss weights."""

    trained: torch.nn.Module
    rollout: Student
    opt: torch.optim.Optimizer
    sched: object | None
    steps: list[int] | None
    stream: str
    dmd_weight: float
    gan_weight: float


def checkpoint_branches(path: Path) -> int:
    """How many split-timestep branches checkpoint ``path`` holds: its meta's ``branches``, or for a
    checkpoint written before that was recorded, the models beyond the student and the critic."""
    meta = read_meta(path)
    if "branches" in meta:
        return int(meta["branches"])
    return max(0, saved_models(path) - 2)


def anchored_ema(params, decay: float) -> EMAModel:
    """EMA that starts at the current weights and uses the constant ``decay`` from the first update:
    ``ema <- decay * ema + (1 - decay) * w`` (diffusers' EMAModel with its warm-up switched off:
    ``min_decay = decay``, ``update_after_step = -1``)."""
    return EMAModel(params, decay=decay, min_decay=decay, update_after_step=-1)


def grad_norm(acc: Accelerator, params, clip: float) -> torch.Tensor:
    """Total gradient norm (before clipping), clipped to ``clip``."""
    return torch.as_tensor(acc.clip_grad_norm_(params, clip)).float()


class DistillTrainer:
    """Runs the stages, logs, probes, checkpoints; returns the EMA student transformer."""

    def __init__(self, cfg: DistillConfig, models: DistillModels, prompts: PromptSource, work_dir: Path,
                 accelerator: Accelerator, bank: TrajectoryBank | None = None, real: RealBank | None = None,
                 progress: bool = True, stop_at: int | None = None) -> None:
        self.cfg, self.m, self.source, self.acc = cfg, models, prompts, accelerator
        self.work = Path(work_dir)
        self.bank, self.real = bank, real
        self.progress, self.stop_at = progress, stop_at
        self.schedule = cfg.student_schedule(models.shift) + [0.0]
        self.k = cfg.student_steps
        self.shape = models.latent_shape()
        self.dev = accelerator.device
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        if cfg.gan.enabled and real is None:
            raise ValueError("the GAN needs a real bank")
        if cfg.trajectory.steps > 0 and bank is None:
            raise ValueError("trajectory guidance needs a trajectory bank")
        self.split_on = cfg.split.steps > 0
        self.split_start = cfg.trajectory.steps + cfg.student.steps
        self.ranges = branch_ranges(cfg.split.boundaries)
        self.branch_steps = cfg.branch_steps(models.shift)

    # -- set-up ---------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        out = [Stage("trajectory", self.cfg.trajectory.steps, self.tg_step),
               Stage("dmd", self.cfg.student.steps, self.dmd_step)]
        if self.split_on:
            out.append(Stage("split", self.cfg.split.steps, self.split_step, student_ema=False))
        return out

    def _setup(self) -> None:
        cfg, acc, m = self.cfg, self.acc, self.m
        critic = Critic(m.fake, cfg.gan)
        opt_tg = torch.optim.AdamW(m.student.parameters(), lr=cfg.trajectory.lr, weight_decay=0.0)
        opt_s = torch.optim.AdamW(m.student.parameters(), lr=cfg.student.lr, weight_decay=0.0)
        opt_c = torch.optim.AdamW(critic.parameters(), lr=cfg.fake.lr, weight_decay=0.0)
        # not prepared: accelerate would step it once per process
        self.sched_s = warmup_cosine(opt_s, cfg.student.warmup, cfg.student.steps, min_ratio=1.0)
        self.ema = EMAModel(m.student.parameters(), decay=cfg.ema_decay)
        seed = cfg.runtime.seed
        self.prompt_sampler = EpochSampler(len(self.source), seed=seed + 101)
        self.tg_sampler = EpochSampler(len(self.bank) if self.bank is not None else 1, seed=seed + 102)
        self.real_sampler = EpochSampler(len(self.real) if self.real is not None else 1, seed=seed + 103)
        self.pixel_alarm = CollapseDetector("probe pixel std", cfg.collapse_ratio, cfg.collapse_patience)
        self.align_alarm = CollapseDetector("probe alignment", cfg.collapse_ratio, cfg.collapse_patience)
        self.student = m.student
        self.critic = critic
        self.student_p, self.critic_p, self.opt_tg, self.opt_s, self.opt_c = acc.prepare(
            m.student, critic, opt_tg, opt_s, opt_c)
        m.pipe.to(self.dev)
        acc.register_for_checkpointing(self.ema, self.sched_s, self.prompt_sampler, self.tg_sampler,
                                       self.real_sampler, self.pixel_alarm, self.align_alarm)

    def _setup_branches(self) -> None:
        """K branch copies with their optimisers and anchored EMAs, prepared and registered after
        everything else (so runs without stage 2 checkpoint exactly as before). Their weights are
        replaced by the stage-1 EMA student when stage 2 starts (:meth:`_start_branches`)."""
        sp, acc = self.cfg.split, self.acc
        self.branches = [trainable_copy(self.m.student) for _ in self.ranges]
        opts = [torch.optim.AdamW(b.parameters(), lr=sp.lr, weight_decay=0.0) for b in self.branches]
        self.branch_emas = [anchored_ema(b.parameters(), sp.ema_decay) for b in self.branches]
        prepared = acc.prepare(*self.branches, *opts)
        k = len(self.branches)
        self.branches_p, self.branch_opts = list(prepared[:k]), list(prepared[k:])
        self.router = BranchRouter(self.branches, self.ranges)
        acc.register_for_checkpointing(*self.branch_emas)

    # -- batches --------------------------------------------------------------------------------
    def _prompts(self, sampler: EpochSampler, names: list[str], batch: int) -> list[str]:
        idx = sampler.next_local(batch, self.rank, self.world)
        return [names[i] for i in idx.tolist()]

    def _cond(self, prompts: list[str], r: StepRandom) -> tuple[PromptEmbeds, PromptEmbeds]:
        """(full conditioning for teacher and fake, the student's with per-sample T5 dropout)."""
        full = self.m.conditioner.full(prompts, self.dev)
        drop = (r.rand() < self.cfg.t5_dropout).to(self.dev)
        return full, self.m.conditioner.for_student(full, drop)

    # -- stage 0 --------------------------------------------------------------------------------
    def tg_step(self, step: int) -> Metrics:
        """``L_TG``: each student step maps teacher state ``t_i`` to ``t_{i+1}`` in one Euler step."""
        b = self.cfg.trajectory.batch_size
        r = StepRandom(self.cfg.runtime.seed, step, "tg", b, self.rank, self.world)
        idx = self.tg_sampler.next_local(b, self.rank, self.world)
        states = self.bank.states[idx].to(self.dev)
        _, scond = self._cond([self.bank.prompts[i] for i in idx.tolist()], r)
        k_idx = r.randint(self.k).to(self.dev)
        with self.acc.autocast():
            loss = tg_loss(self.student_p, states, k_idx, self.schedule, scond)
        self.acc.backward(loss)
        gn = grad_norm(self.acc, self.student_p.parameters(), self.cfg.student.grad_clip)
        self.opt_tg.step()
        self.opt_tg.zero_grad(set_to_none=True)
        return {"tg/loss": loss.detach(), "tg/grad_norm": gn}

    # -- stage 1 --------------------------------------------------------------------------------
    def dmd_step(self, step: int) -> Metrics:
        critic: Metrics = {}
        for u in range(self.cfg.fake.updates):
            critic.update(self.critic_update(step, u))
        return {**self.student_update(step), **critic}  # student first: the progress bar shows the first four

    def critic_update(self, step: int, u: int, sampler: Student | None = None) -> Metrics:
        """Fake flow matching on detached student samples (+ hinge discriminator loss on features).
        ``sampler`` makes the samples (default: the student; stage 2: the branch router)."""
        cfg, b = self.cfg, self.cfg.batch_size
        r = StepRandom(cfg.runtime.seed, step, f"critic{u}", b, self.rank, self.world)
        full, scond = self._cond(self._prompts(self.prompt_sampler, self.source.prompts, b), r)
        noise, eps = r.randn(*self.shape).to(self.dev), r.randn(*self.shape).to(self.dev)
        k_idx = r.randint(self.k).to(self.dev)
        pts = evaluation_times(k_idx, self.schedule, cfg.dmd, r.rand().to(self.dev), r.rand().to(self.dev))
        with self.acc.autocast():
            x0_s = student_sample(sampler if sampler is not None else self.student, noise, self.schedule, scond, k_idx)
        x_fm = fake_input(x0_s, eps, pts.tau)
        out: Metrics = {}
        if cfg.gan.enabled:
            ridx = self.real_sampler.next_local(b, self.rank, self.world)
            x0_r = self.real.latents[ridx].to(self.dev)
            rcond = self.m.conditioner.full([self.real.prompts[i] for i in ridx.tolist()], self.dev)
            x_r = flow.interpolate(x0_r, r.randn(*self.shape).to(self.dev), pts.tau)
            n = x_fm.shape[0]
            with self.acc.autocast():
                v, logits = self.critic_p(torch.cat([x_fm, x_r]), torch.cat([pts.tau, pts.tau]),
                                          PromptEmbeds.cat([full, rcond]), features=True)
            fake_lg, real_lg = split_logits(logits, [n, n])
            d_loss = hinge_d_loss(real_lg, fake_lg)
            v = v[:n]
            out.update({"gan/d_loss": d_loss.detach(), "gan/d_real": torch.stack([x.mean() for x in real_lg]).mean().detach(),
                        "gan/d_fake": torch.stack([x.mean() for x in fake_lg]).mean().detach()})
        else:
            with self.acc.autocast():
                v, _ = self.critic_p(x_fm, pts.tau, full)
            d_loss = torch.zeros((), device=self.dev)
        fm = fake_flow_loss(v, x0_s, eps)
        loss = cfg.fake.weight * fm + cfg.gan.discriminator_weight * d_loss
        self.acc.backward(loss)
        gn = grad_norm(self.acc, self.critic_p.parameters(), cfg.fake.grad_clip)
        self.opt_c.step()
        self.opt_c.zero_grad(set_to_none=True)
        if cfg.gan.enabled and cfg.gan.reinit_prob > 0:
            draws = [r.scalar() for _ in self.critic.disc.heads]
            seed = (cfg.runtime.seed * 1_000_003 + step) * 10 + u
            reinit_heads(self.critic.disc, self.opt_c, cfg.gan.reinit_prob, draws, seed * 97)
        out.update({"fake/loss": fm.detach(), "fake/grad_norm": gn})
        return out

    def student_update(self, step: int) -> Metrics:
        """One optimiser step of the student on :meth:`student_loss`."""
        loss, out = self.student_loss(step)
        gn = self._optimise(loss, self.student_p, self.opt_s, self.sched_s)
        first = {k: out.pop(k) for k in ("dmd/loss", "dmd/grad_norm", "gan/g_loss")}  # the bar shows four
        return {**first, "student/grad_norm": gn, **out, "student/lr": torch.tensor(self.sched_s.get_last_lr()[0])}

    def student_loss(self, step: int, gan: bool = True) -> tuple[torch.Tensor, Metrics]:
        """``dmd.weight * L_dm + gan.generator_weight * L_G`` at the evaluation point of a random step
        (``gan=False`` leaves out ``L_G``). Draws the step's prompts and noise; no backward."""
        cfg = self.cfg
        gen = Generator(self.student_p, self.student, self.opt_s, self.sched_s, None, "student", cfg.dmd.weight,
                        cfg.gan.generator_weight)
        loss, m = self.generator_loss(step, gen, gan=gan)
        return loss, {"dmd/loss": m["dmd_loss"], "dmd/grad_norm": m["dmd_grad_norm"], "gan/g_loss": m["g_loss"],
                      "student/x0_std": m["x0_std"]}

    def _optimise(self, loss: torch.Tensor, module: torch.nn.Module, opt, sched) -> torch.Tensor:
        """Backward, clip (returns the norm before clipping), step the optimiser (and LR schedule)."""
        self.acc.backward(loss)
        gn = grad_norm(self.acc, module.parameters(), self.cfg.student.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        return gn

    def generator_loss(self, step: int, gen: Generator, gan: bool = True) -> tuple[torch.Tensor, Metrics]:
        """``gen.dmd_weight * L_dm + gen.gan_weight * L_G`` at the evaluation point of a random step
        ``i`` drawn from ``gen.steps``: steps ``1..i-1`` by ``gen.rollout`` without gradients, step ``i``
        by ``gen.trained`` with gradients, the teacher (CFG) and the frozen critic at ``x_tau``
        (``gan=False`` leaves out ``L_G``). No backward."""
        cfg, b = self.cfg, self.cfg.batch_size
        r = StepRandom(cfg.runtime.seed, step, gen.stream, b, self.rank, self.world)
        full, scond = self._cond(self._prompts(self.prompt_sampler, self.source.prompts, b), r)
        noise, eps = r.randn(*self.shape).to(self.dev), r.randn(*self.shape).to(self.dev)
        if gen.steps is None:
            k_idx = r.randint(self.k).to(self.dev)
        else:
            k_idx = torch.tensor(gen.steps)[r.randint(len(gen.steps))].to(self.dev)
        pts = evaluation_times(k_idx, self.schedule, cfg.dmd, r.rand().to(self.dev), r.rand().to(self.dev))
        with self.acc.autocast():
            x_i = rollout_to_step(gen.rollout, noise, self.schedule, scond, k_idx)
            t_i = times_at(self.schedule, k_idx)
            v = predict_velocity(gen.trained, x_i, t_i, scond).to(x_i.dtype)
            x_tau, x0_hat = evaluation_point(x_i, v, t_i, pts, eps)
            with torch.no_grad():
                uncond = self.m.conditioner.uncond(x_i.shape[0], self.dev)
                v_real = guided_velocity(self.m.teacher, x_tau.detach(), pts.tau, full, uncond, cfg.guidance)
            with params_frozen(self.critic):
                if cfg.gan.enabled:
                    v_fake, logits = self.critic(x_tau, pts.tau, full, features=True)
                else:
                    with torch.no_grad():
                        v_fake, logits = self.critic(x_tau.detach(), pts.tau, full)
        dm = dmd_loss(x0_hat, x_tau, pts.tau, v_real, v_fake.detach())
        g_loss = hinge_g_loss(logits) if (logits and gan) else torch.zeros((), device=self.dev)
        loss = gen.dmd_weight * dm.loss + gen.gan_weight * g_loss
        return loss, {"dmd_loss": dm.loss.detach(), "dmd_grad_norm": dm.grad_norm.detach(), "g_loss": g_loss.detach(),
                      "x0_std": x0_hat.detach().float().std()}

    # -- stage 2 --------------------------------------------------------------------------------
    def _start_branches(self) -> None:
        """Every branch (and its anchored EMA) starts from the stage-1 EMA student."""
        for branch, ema in zip(self.branches, self.branch_emas):
            self.ema.copy_to(branch.parameters())
            ema.shadow_params = [p.detach().clone() for p in branch.parameters()]
            ema.optimization_step = 0

    def split_step(self, step: int) -> Metrics:
        """Critic updates on samples of the routed student, then one generator update per branch on
        the student steps of its range; each branch's EMA follows it."""
        if step == self.split_start:
            self._start_branches()
        sp = self.cfg.split
        critic: Metrics = {}
        for u in range(self.cfg.fake.updates):
            critic.update(self.critic_update(step, u, sampler=self.router))
        out: Metrics = {}
        for b in range(len(self.branches)):
            gen = Generator(self.branches_p[b], self.router, self.branch_opts[b], None, self.branch_steps[b],
                            f"branch{b}", sp.dmd_weight, sp.gan_weight)
            loss, res = self.generator_loss(step, gen)
            res["grad_norm"] = self._optimise(loss, gen.trained, gen.opt, gen.sched)
            self.branch_emas[b].step(self.branches[b].parameters())
            out.update({f"split{b}/dmd_loss": res["dmd_loss"], f"split{b}/g_loss": res["g_loss"],
                        f"split{b}/grad_norm": res["grad_norm"], f"split{b}/x0_std": res["x0_std"]})
        return {**out, **critic}

    def branch_results(self) -> list[torch.nn.Module]:
        """The branches with their EMA weights (after :meth:`run`); empty without stage 2."""
        if not self.split_on:
            return []
        out = []
        for branch_p, ema in zip(self.branches_p, self.branch_emas):
            branch = self.acc.unwrap_model(branch_p)
            ema.copy_to(branch.parameters())
            out.append(branch)
        return out

    # -- probes and grids -----------------------------------------------------------------------
    def probe_prompts(self) -> tuple[list[str], list | None]:
        n = self.cfg.probe_images
        if self.source.specs is not None:
            specs = split_specs("val", n, seed=self.cfg.runtime.seed + 99)
            return [canonical_prompt(s) for s in specs], specs
        return [self.source.prompts[i % len(self.source)] for i in range(n)], None

    def _ema_images(self, prompts: list[str], step: int) -> np.ndarray:
        """Samples of the EMA student, or (during stage 2) of the EMA branches, each step routed to its branch."""
        split = self.split_on and step > self.split_start
        pairs = list(zip(self.branch_emas, self.branches)) if split else [(self.ema, self.student)]
        for ema, mod in pairs:
            ema.store(mod.parameters())
            ema.copy_to(mod.parameters())
        try:
            return generate(self.m.pipe, prompts, list(range(len(prompts))), self.schedule, guidance=1.0,
                            transformer=self.router if split else self.student, batch_size=32)
        finally:
            for ema, mod in pairs:
                ema.restore(mod.parameters())

    def probe(self, step: int, log: RunLogger) -> None:
        """EMA-student samples of fixed probe prompts: pixel std (and judge alignment for shapes).
        Runs on every process (same weights, same numbers) so a collapse stops all of them."""
        if self.cfg.probe_images < 1:
            return
        prompts, specs = self.probe_prompts()
        imgs = self._ema_images(prompts, step)
        vals = {"probe/pixel_std": float(imgs.astype(np.float32).std() / 255.0)}
        if specs is not None:
            vals["probe/alignment"] = float(np.mean([judge(im, s).correct for im, s in zip(imgs, specs)]))
        log.scalars(step, vals, show=False)
        self.pixel_alarm.update(step, vals["probe/pixel_std"])
        if specs is not None:
            self.align_alarm.update(step, vals["probe/alignment"])

    def sample_grid(self, step: int, log: RunLogger) -> None:
        if self.acc.is_main_process:
            prompts = self.probe_prompts()[0][:8]
            grid = make_grid(self._ema_images(prompts, step), cols=4, scale=2, captions=prompts)
            save_png(self.work / "samples" / f"step{step:07d}.png", grid)
            log.image(step, "samples", grid)
        self.acc.wait_for_everyone()

    # -- main loop ------------------------------------------------------------------------------
    def run(self) -> torch.nn.Module:
        cfg, acc = self.cfg, self.acc
        self._setup()
        stages = self.stages()
        total = sum(s.steps for s in stages)
        ckpt = CheckpointManager(self.work / "checkpoints")
        step = self.restore(ckpt)
        self.ema.to(self.dev)
        for ema in getattr(self, "branch_emas", []):
            ema.to(self.dev)
        log = RunLogger(acc, self.work, "distill", total=total, start=step, desc=f"distill {self.k}-step",
                        config={"student_steps": self.k, "timestep_sharing": cfg.dmd.timestep_sharing},
                        progress=self.progress)
        log.write(f"distill: {self.k}-step student, schedule {[round(t, 4) for t in self.schedule]}, "
                  + ", ".join(f"{s.name} {s.steps}" for s in stages) + (f"; resuming at step {step}" if step else ""))
        try:
            if step == 0:
                self.probe(0, log)
            while step < total:
                stage = self._stage_at(stages, step)
                metrics = stage.step(step)
                values = self._reduce(metrics)
                check_finite(step, **values)
                if stage.student_ema:
                    self.ema.step(self.student.parameters())
                step += 1
                log.advance()
                if step % cfg.log_every == 0 or step == total:
                    log.scalars(step, values)
                if cfg.probe_every > 0 and (step % cfg.probe_every == 0 or step == total):
                    self.probe(step, log)
                if cfg.sample_every > 0 and (step % cfg.sample_every == 0 or step == total):
                    self.sample_grid(step, log)
                if step % cfg.checkpoint_every == 0 or step == total or step == self.stop_at:
                    ckpt.save(acc, step, meta={"branches": len(self.ranges) if self.split_on else 0})
                if step == self.stop_at and step < total:
                    raise StopTraining(f"stopped at step {step} as asked; resume to continue")
        finally:
            log.close(end_training=False)  # the caller still exports and synchronises
        student = self.acc.unwrap_model(self.student_p)
        self.ema.copy_to(student.parameters())
        return student

    def restore(self, ckpt: CheckpointManager, path: Path | None = None) -> int:
        """Restore checkpoint ``path`` (default: the newest) after :meth:`_setup` and return its step
        (0 without one). The stage-2 branches are prepared before it is loaded when it holds them,
        after it otherwise: a checkpoint of a run without stage 2 (the end of stage 1, copied in by
        ``distill --init-from``) restores everything but the branches, which stage 2 starts from the
        stage-1 EMA student anyway."""
        latest = path or ckpt.latest()
        pre_split = self.split_on and latest is not None and checkpoint_branches(latest) == 0
        if self.split_on and not pre_split:
            self._setup_branches()
        step = ckpt.load(self.acc, latest)
        if pre_split:
            if step > self.split_start:
                raise UserError(f"checkpoint {latest} is past the end of stage 1 (step {self.split_start}) but has no "
                                "split-timestep branches; it does not belong to this config")
            self._setup_branches()
        return step

    @staticmethod
    def _stage_at(stages: list[Stage], step: int) -> Stage:
        end = 0
        for s in stages:
            end += s.steps
            if step < end:
                return s
        return stages[-1]

    def _reduce(self, metrics: Metrics) -> dict[str, float]:
        """Mean of each metric over processes (one all-reduce), as floats: every process then
        sees the same numbers, so a NaN alarm stops all of them together."""
        names = list(metrics)
        vec = torch.stack([metrics[k].detach().float().reshape(()).to(self.dev) for k in names])
        if self.world > 1:
            vec = self.acc.reduce(vec, reduction="mean")
        return dict(zip(names, vec.tolist()))
