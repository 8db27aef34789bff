"""The distillation method: SD3.5-Flash's flow DMD recipe as one object.

:class:`FlowDMD` owns the models (frozen teacher, trainable student, critic = fake model +
discriminator heads, split-timestep branches), their optimisers, the student's EMA and the data
samplers. It says what each stage computes, as :class:`~sd35flash.train.loop.Update` objects whose
loss closures return ``(loss, metrics)``; it never calls ``backward`` or ``step`` (the generic
:class:`~sd35flash.train.loop.TrainLoop` does). Stages:

* ``trajectory`` (stage 0): :meth:`trajectory_loss`, ``L_TG`` on cached teacher trajectories;
* ``dmd`` (stage 1): ``fake.updates`` x :meth:`critic_loss`, then :meth:`student_loss`
  (``dmd.weight * L_dm + gan.generator_weight * L_G``);
* ``split`` (stage 2, when ``split.steps > 0``): critic updates on the routed student's samples,
  then one :meth:`generator_loss` per branch on the student steps of its time range.

Random draws come from :class:`.randomness.StepRandom` (seeded by step and stream), so N processes
with the same global batch reproduce one process, and a resumed run draws what a straight one does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from accelerate import Accelerator

from .. import flow
from ..models.branches import BranchRouter, branch_ranges
from ..sampling import PromptEmbeds, generate, guided_velocity, predict_velocity
from ..train.data import EpochSampler
from ..train.ema import EMA, OffloadedEMA, anchored_ema
from ..train.loop import Metrics, Stage, Update
from ..train.optim import free_state, make_optimizer
from ..train.schedules import warmup_cosine
from ..train.sharding import Sharding, local_tensors, make_sharding
from ..world import canonical_prompt, split_specs
from .adversarial import d_loss as gan_d_loss
from .adversarial import g_loss as gan_g_loss
from .adversarial import reinit_draws, reinit_heads
from .conditioning import ConditioningProvider, precompute
from .config import DistillConfig
from .critic import Critic, split_logits
from .dmd import dmd_loss, evaluation_point, evaluation_times
from .fake import fake_flow_loss, fake_input, fake_tau
from .models import DistillModels, checkpointing_off, params_frozen
from .prompts import PromptSource
from .randomness import StepRandom
from .real import RealBank, RenderBank
from .rollout import Student, rollout_to_step, student_sample, times_at
from .trajectory import TrajectoryBank, tg_loss


@dataclass
class GeneratorUpdate:
    """What one generator update trains: ``trained`` (the prepared module whose velocity at step
    ``i`` carries the gradient), ``rollout`` (the unwrapped student or branch router that runs steps
    ``1..i-1`` without gradients), the student steps ``i`` it is trained on (``None``: all K), the
    random stream and the loss weights."""

    trained: torch.nn.Module
    rollout: Student
    steps: list[int] | None
    stream: str
    dmd_weight: float
    gan_weight: float


class FlowDMD:
    """Teacher, student, critic and branches of a distillation run, and the losses of each stage."""

    def __init__(self, cfg: DistillConfig, models: DistillModels, prompts: PromptSource, accelerator: Accelerator,
                 bank: TrajectoryBank | None = None, real: RealBank | RenderBank | None = None) -> None:
        if cfg.gan.enabled and real is None:
            raise ValueError("the GAN needs a real bank")
        if cfg.trajectory.steps > 0 and bank is None:
            raise ValueError("trajectory guidance needs a trajectory bank")
        self.cfg, self.m, self.source, self.acc = cfg, models, prompts, accelerator
        self.bank, self.real = bank, real
        self.schedule = flow.Schedule.from_step_times(cfg.student_schedule(models.shift))
        self.k = cfg.student_steps
        self.shape = models.latent_shape()
        self.dev = accelerator.device
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.split_on = cfg.split.steps > 0
        self.split_start = cfg.stage1_step(cfg.student.steps)
        self.ranges = branch_ranges(cfg.split.boundaries)
        self.branch_steps = cfg.branch_steps(models.shift)
        self.branches: list[torch.nn.Module] = []
        self.branch_emas: list[EMA] = []
        self.cond: ConditioningProvider = models.conditioner
        self.sharding: Sharding = (models.sharding if getattr(models, "sharding", None) is not None
                                   else make_sharding(cfg.sharding, accelerator))

    # -- set-up ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Build the critic, the optimisers, the student's EMA and the samplers; prepare the
        trainable modules and optimisers with accelerate. With ``sharding: fsdp`` the student, the
        critic and the frozen teacher are first sharded (:mod:`~sd35flash.train.sharding`). With
        ``memory.conditioning: precompute``, encode every prompt the run uses once, then park the
        text encoders."""
        cfg, m = self.cfg, self.m
        critic = Critic(m.fake, cfg.gan)
        sh = self.sharding
        sh.shard(m.student)
        sh.shard(critic)
        m.shard_teacher(sh)
        kind = cfg.memory.optimizer
        opt_tg = make_optimizer(m.student.parameters(), cfg.trajectory.lr, kind)
        opt_s = make_optimizer(m.student.parameters(), cfg.student.lr, kind)
        if cfg.gan.enabled and cfg.gan.lr > 0:  # the heads in their own group, at gan.lr
            heads = {id(p) for p in critic.disc.parameters()}
            opt_c = make_optimizer([p for p in critic.parameters() if id(p) not in heads], cfg.fake.lr, kind)
            opt_c.add_param_group({"params": list(critic.disc.parameters()), "lr": cfg.gan.lr})
        else:
            opt_c = make_optimizer(critic.parameters(), cfg.fake.lr, kind)
        # not prepared: accelerate would step it once per process
        self.sched_s = warmup_cosine(opt_s, cfg.student.warmup, cfg.student.steps, min_ratio=1.0)
        self.ema = self._ema(m.student.parameters(), cfg.ema_decay, anchored=False)
        seed = cfg.runtime.seed
        self.prompt_sampler = EpochSampler(len(self.source), seed=seed + 101)
        self.tg_sampler = EpochSampler(len(self.bank) if self.bank is not None else 1, seed=seed + 102)
        self.real_sampler = EpochSampler(len(self.real) if self.real is not None else 1, seed=seed + 103)
        self.student = m.student
        self.critic = critic
        self.student_p, self.critic_p, self.opt_tg, self.opt_s, self.opt_c = sh.prepare(
            m.student, critic, opt_tg, opt_s, opt_c)
        m.pipe.to(self.dev)
        if cfg.memory.conditioning == "precompute":
            self.cond = precompute(m.conditioner, self.run_prompts(), self.dev)
            m.park_encoders()

    def run_prompts(self) -> list[str]:
        """Every prompt the run conditions on: the training prompts, the trajectory bank's, the
        real bank's and the probes'."""
        out = list(self.source.prompts)
        for bank in (self.bank, self.real):
            if bank is not None:
                out += list(bank.prompts)
        return out + self.probe_prompts()[0]

    def probe_prompts(self) -> tuple[list[str], list | None]:
        """The fixed probe prompts (and, for shapes prompts, their ``val`` specs)."""
        n = self.cfg.probe_images
        if self.source.specs is not None:
            specs = split_specs("val", n, seed=self.cfg.runtime.seed + 99)
            return [canonical_prompt(s) for s in specs], specs
        return [self.source.prompts[i % len(self.source)] for i in range(n)], None

    def _ema(self, params, decay: float, anchored: bool) -> EMA:
        """The student's EMA (``anchored=False``) or a branch's anchored EMA, on ``memory.ema_device``."""
        if self.cfg.memory.ema_device == "cpu":
            extra = {"min_decay": decay, "update_after_step": -1} if anchored else {}
            return OffloadedEMA(params, "cpu", decay=decay, **extra)
        return anchored_ema(params, decay) if anchored else EMA(params, decay=decay)

    def checkpoint_objects(self) -> list:
        """The method's state outside prepared modules and optimisers, in checkpoint order: the
        student's EMA, its LR schedule, the prompt, trajectory and real-sample samplers."""
        return [self.ema, self.sched_s, self.prompt_sampler, self.tg_sampler, self.real_sampler]

    def allocate_branches(self) -> list[EMA]:
        """K branch copies of the student (LoRA mode: K branch adapters on the shared base) with their
        optimisers and anchored EMAs, prepared with accelerate; returns the EMAs (to register for
        checkpointing). Their weights are replaced by the stage-1 EMA student when stage 2 starts
        (:meth:`start_branches`)."""
        sp = self.cfg.split
        self.branches = [self.sharding.shard(self.m.branch_model(b, copy=self.sharding.copy))
                         for b in range(len(self.ranges))]
        opts = [make_optimizer(b.parameters(), sp.lr, self.cfg.memory.optimizer) for b in self.branches]
        self.branch_emas = [self._ema(b.parameters(), sp.ema_decay, anchored=True) for b in self.branches]
        prepared = self.sharding.prepare(*self.branches, *opts)
        k = len(self.branches)
        self.branches_p, self.branch_opts = list(prepared[:k]), list(prepared[k:])
        self.router = BranchRouter(self.branches, self.ranges)
        return self.branch_emas

    def ema_to(self, device: torch.device | str) -> None:
        """Move the student's EMA (and the branches' EMAs) to ``device``."""
        self.ema.to(device)
        for ema in self.branch_emas:
            ema.to(device)

    # -- public: data position -----------------------------------------------------------------
    def data_state(self) -> dict:
        """The position of the prompt sampler (to draw the same minibatches again)."""
        return self.prompt_sampler.state_dict()

    def load_data_state(self, state: dict) -> None:
        self.prompt_sampler.load_state_dict(state)

    def student_parameters(self) -> list[torch.nn.Parameter]:
        """The student's trainable parameters (of the prepared module: their ``.grad`` is what the
        optimiser steps on)."""
        return [p for p in self.student_p.parameters() if p.requires_grad]

    # -- stages ---------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        out = [Stage("trajectory", self.cfg.trajectory.steps, lambda step: [self.trajectory_update(step)]),
               Stage("fake_warmup", self.cfg.fake.warmup_steps, self.warmup_updates),
               Stage("dmd", self.cfg.student.steps, self.dmd_updates, begin=self.begin_dmd)]
        if self.split_on:
            out.append(Stage("split", self.cfg.split.steps, self.split_updates, begin=self.start_branches))
        return out

    def begin_dmd(self, step: int) -> None:
        """Trajectory guidance is over: its optimiser state goes (``memory.free_finished_optimizers``)."""
        if self.cfg.memory.free_finished_optimizers:
            free_state(self.opt_tg)

    def trajectory_update(self, step: int) -> Update:
        return Update(lambda micro: self.trajectory_loss(step), self.opt_tg, self.student_p,
                      self.cfg.student.grad_clip, "tg/grad_norm", "tg/loss")

    def warmup_updates(self, step: int) -> list[Update]:
        """Fake warm-up (``fake.warmup_steps``): ``fake.updates`` critic updates, the student frozen."""
        return [self.critic_update(step, u) for u in range(self.cfg.fake.updates)]

    def dmd_updates(self, step: int) -> list[Update]:
        """``fake.updates`` critic updates, then one student update (whose metrics lead)."""
        return [self.critic_update(step, u) for u in range(self.cfg.fake.updates)] + [self.student_update(step)]

    def critic_update(self, step: int, u: int, sampler: Student | None = None) -> Update:
        r = self._random(step, f"critic{u}", self.cfg.batch_size)
        return Update(lambda micro: self.critic_loss(step, u, sampler, r), self.opt_c, self.critic_p,
                      self.cfg.fake.grad_clip, "fake/grad_norm", "fake/loss", after=lambda: self.reinit(step, u, r))

    def student_update(self, step: int) -> Update:
        return Update(lambda micro: self.student_loss(step), self.opt_s, self.student_p, self.cfg.student.grad_clip,
                      "student/grad_norm", "student/loss", scheduler=self.sched_s, lr_key="student/lr", leads=True)

    def split_updates(self, step: int) -> list[Update]:
        """Critic updates on samples of the routed student, then one generator update per branch on
        the student steps of its range; each branch's EMA follows it."""
        out = [self.critic_update(step, u, sampler=self.router) for u in range(self.cfg.fake.updates)]
        for b in range(len(self.branches)):
            out.append(Update(lambda micro, b=b: self.branch_loss(step, b), self.branch_opts[b], self.branches_p[b],
                              self.cfg.student.grad_clip, f"split{b}/grad_norm", f"split{b}/loss",
                              after=lambda b=b: self.after_branch_update(step, b), leads=True))
        return out

    def start_branches(self, step: int) -> None:
        """Every branch (and its anchored EMA) starts from the stage-1 EMA student; the student's
        optimiser state goes (``memory.free_finished_optimizers``): stage 2 trains the branches."""
        for branch, ema in zip(self.branches, self.branch_emas):
            self.ema.copy_to(branch.parameters())
            home = getattr(ema, "home", None)
            ema.shadow_params = [p.detach().clone().to(home) if home is not None else p.detach().clone()
                                 for p in local_tensors(branch.parameters())]
            ema.optimization_step = 0
        if self.cfg.memory.free_finished_optimizers:
            free_state(self.opt_s)

    # -- batches --------------------------------------------------------------------------------
    def _random(self, step: int, stream: str, batch: int) -> StepRandom:
        return StepRandom(self.cfg.runtime.seed, step, stream, batch, self.rank, self.world)

    def _prompts(self, sampler: EpochSampler, names: list[str], batch: int) -> list[str]:
        idx = sampler.next_local(batch, self.rank, self.world)
        return [names[i] for i in idx.tolist()]

    def _cond(self, prompts: list[str], r: StepRandom) -> tuple[PromptEmbeds, PromptEmbeds]:
        """(full conditioning for teacher and fake, the student's with per-sample T5 dropout)."""
        full, scond, _ = self._cond_drop(prompts, r)
        return full, scond

    def _cond_drop(self, prompts: list[str], r: StepRandom) -> tuple[PromptEmbeds, PromptEmbeds, torch.Tensor]:
        """:meth:`_cond` and the per-sample T5 dropout mask."""
        full = self.cond.full(prompts, self.dev)
        drop = (r.rand() < self.cfg.t5_dropout).to(self.dev)
        return full, self.cond.for_student(full, drop), drop

    def fake_cond(self, full: PromptEmbeds, scond: PromptEmbeds) -> PromptEmbeds:
        """What the fake is conditioned on: the student's conditioning with
        ``fake.match_student_conditioning``, else the full one."""
        return scond if self.cfg.fake.match_student_conditioning else full

    # -- losses (no backward) ---------------------------------------------------------------------
    def trajectory_loss(self, step: int) -> tuple[torch.Tensor, Metrics]:
        """``L_TG``: each student step maps teacher state ``t_i`` to ``t_{i+1}`` in one Euler step."""
        b = self.cfg.trajectory.batch_size
        r = self._random(step, "tg", b)
        idx = self.tg_sampler.next_local(b, self.rank, self.world)
        states = self.bank.states[idx].to(self.dev)
        _, scond = self._cond([self.bank.prompts[i] for i in idx.tolist()], r)
        k_idx = r.randint(self.k).to(self.dev)
        with self.acc.autocast():
            loss = tg_loss(self.student_p, states, k_idx, self.schedule, scond, self.cfg.trajectory.loss)
        return loss, {"tg/loss": loss.detach()}

    def critic_loss(self, step: int, u: int, sampler: Student | None = None,
                    r: StepRandom | None = None) -> tuple[torch.Tensor, Metrics]:
        """``fake.weight * L_fake + gan.discriminator_weight * L_D``: fake flow matching on detached
        student samples (at the times of ``fake.mixture``), plus the discriminator loss (``gan.loss``)
        on features of real and fake samples at the same taus (``gan.tau``). ``gan.paired``: the batch's
        prompts are the real batch's. ``sampler`` makes the samples (default: the student; stage 2:
        the router)."""
        cfg, b = self.cfg, self.cfg.batch_size
        gan = cfg.gan
        r = r if r is not None else self._random(step, f"critic{u}", b)
        ridx = self.real_sampler.next_local(b, self.rank, self.world) if gan.enabled and gan.paired else None
        prompts = ([self.real.prompts[i] for i in ridx.tolist()] if ridx is not None
                   else self._prompts(self.prompt_sampler, self.source.prompts, b))
        full, scond, drop = self._cond_drop(prompts, r)
        fcond = self.fake_cond(full, scond)
        noise, eps = r.randn(*self.shape).to(self.dev), r.randn(*self.shape).to(self.dev)
        k_all = r.randint_global(self.k)  # every process runs the rollout steps the global batch needs
        k_idx = k_all[r.sl].to(self.dev)
        pts = evaluation_times(k_idx, self.schedule, cfg.dmd, r.rand().to(self.dev), r.rand().to(self.dev))
        with self.acc.autocast():
            x0_s = student_sample(sampler if sampler is not None else self.student, noise, self.schedule, scond, k_idx,
                                  global_idx=k_all)
        real_noise = r.randn(*self.shape).to(self.dev) if gan.enabled else None
        tau_range = cfg.dmd.random_tau_range
        tau_f = fake_tau(cfg.fake.mixture, pts.tau, r.rand().to(self.dev) if cfg.fake.mixture != "shared" else None,
                         tau_range)
        x_fm = fake_input(x0_s, eps, tau_f)
        out: Metrics = {}
        if gan.enabled:
            if ridx is None:
                ridx = self.real_sampler.next_local(b, self.rank, self.world)
                rcond = self.cond.full([self.real.prompts[i] for i in ridx.tolist()], self.dev)
                if cfg.fake.match_student_conditioning:
                    rcond = self.cond.for_student(rcond, drop)
            else:
                rcond = fcond
            x0_r = self.real.take(ridx).to(self.dev)
            tau_d = tau_f if gan.tau == "shared" else fake_tau("uniform_steps", tau_f, r.rand().to(self.dev), tau_range)
            x_r = flow.interpolate(x0_r, real_noise, tau_d)
            n = x_fm.shape[0]
            if gan.tau == "shared":
                xs, taus, conds, sizes = [x_fm, x_r], [tau_f, tau_d], [fcond, rcond], [n, n]
            else:
                xs, taus, conds, sizes = [x_fm, fake_input(x0_s, eps, tau_d), x_r], [tau_f, tau_d, tau_d], \
                    [fcond, fcond, rcond], [n, n, n]
            with self.acc.autocast():
                v, logits = self.critic_p(torch.cat(xs), torch.cat(taus), PromptEmbeds.cat(conds), features=True)
            fake_lg, real_lg = split_logits(logits, sizes)[-2:]
            d_loss = gan_d_loss(gan.loss, real_lg, fake_lg)
            v = v[:n]
            out.update({"gan/d_loss": d_loss.detach(),
                        "gan/d_real": torch.stack([x.mean() for x in real_lg]).mean().detach(),
                        "gan/d_fake": torch.stack([x.mean() for x in fake_lg]).mean().detach()})
        else:
            with self.acc.autocast():
                v, _ = self.critic_p(x_fm, tau_f, fcond)
            d_loss = torch.zeros((), device=self.dev)
        fm = fake_flow_loss(v, x0_s, eps)
        out["fake/loss"] = fm.detach()
        return cfg.fake.weight * fm + cfg.gan.discriminator_weight * d_loss, out

    def reinit(self, step: int, u: int, r: StepRandom) -> None:
        """After a critic update: re-initialise each head with probability ``gan.reinit_prob``."""
        cfg = self.cfg
        if cfg.gan.enabled and cfg.gan.reinit_prob > 0:
            draws = reinit_draws(len(self.critic.disc.heads), cfg.gan.reinit, r.scalar)
            seed = (cfg.runtime.seed * 1_000_003 + step) * 10 + u
            reinit_heads(self.critic.disc, self.opt_c, cfg.gan.reinit_prob, draws, seed * 97)

    def student_loss(self, step: int, gan: bool = True,
                     timestep_sharing: bool | None = None) -> tuple[torch.Tensor, Metrics]:
        """``dmd.weight * L_dm + gan.generator_weight * L_G`` at the evaluation point of a random step
        (``gan=False`` leaves out ``L_G``; ``timestep_sharing`` overrides ``dmd.timestep_sharing``).
        Draws the step's prompts and noise."""
        cfg = self.cfg
        gen = GeneratorUpdate(self.student_p, self.student, None, "student", cfg.dmd.weight, cfg.gan.generator_weight)
        loss, m = self.generator_loss(step, gen, gan=gan, timestep_sharing=timestep_sharing)
        return loss, {"dmd/loss": m["dmd_loss"], "dmd/grad_norm": m["dmd_grad_norm"], "gan/g_loss": m["g_loss"],
                      "student/x0_std": m["x0_std"]}

    def branch_loss(self, step: int, b: int) -> tuple[torch.Tensor, Metrics]:
        """``split.dmd_weight * L_dm + split.gan_weight * L_G`` of branch ``b`` on the steps of its range."""
        sp = self.cfg.split
        gen = GeneratorUpdate(self.branches_p[b], self.router, self.branch_steps[b], f"branch{b}", sp.dmd_weight,
                        sp.gan_weight)
        loss, m = self.generator_loss(step, gen)
        return loss, {f"split{b}/dmd_loss": m["dmd_loss"], f"split{b}/g_loss": m["g_loss"],
                      f"split{b}/x0_std": m["x0_std"]}

    def after_branch_update(self, step: int, b: int) -> Metrics | None:
        """Branch ``b``'s EMA follows it; after the last branch's update of a logged step (full mode),
        the branches' weight distances (:meth:`branch_distances`)."""
        self.branch_emas[b].step(self.branches[b].parameters())
        done = step + 1
        if b == len(self.branches) - 1 and self.cfg.mode == "full" and \
                (done % max(1, self.cfg.log_every) == 0 or done == self.split_start + self.cfg.split.steps):
            return self.branch_distances()
        return None

    @torch.no_grad()
    def branch_distances(self) -> Metrics:
        """How far stage 2 has moved the (raw) branches, relative to the weights they started from,
        the stage-1 EMA student ``theta_pre`` (whose EMA stays frozen in stage 2):

            split{b}/drift  = ||theta_b - theta_pre|| / ||theta_pre||
            split/gap       = ||theta_0 - theta_1|| / ||theta_pre||   (the first two branches)

        Full mode only (in LoRA mode the branches are adapters on one base). Under FSDP each process
        holds a shard, so the squared norms are summed over processes before the ratio."""
        pre = [t.to(self.dev) for t in self.ema.shadow_params]
        branches = [local_tensors(b.parameters()) for b in self.branches]
        sq = [sum(p.float().pow(2).sum() for p in pre)]
        sq += [sum((w.float() - p.float()).pow(2).sum() for w, p in zip(ws, pre)) for ws in branches]
        if len(branches) > 1:
            sq.append(sum((a.float() - c.float()).pow(2).sum() for a, c in zip(branches[0], branches[1])))
        vec = torch.stack([torch.as_tensor(v, device=self.dev, dtype=torch.float32) for v in sq])
        if self.cfg.sharding == "fsdp" and torch.distributed.is_initialized():
            torch.distributed.all_reduce(vec)
        rel = (vec[1:] / vec[0].clamp_min(1e-30)).sqrt()
        out = {f"split{b}/drift": rel[b] for b in range(len(branches))}
        if len(branches) > 1:
            out["split/gap"] = rel[len(branches)]
        return out

    def generator_loss(self, step: int, gen: GeneratorUpdate, gan: bool = True,
                       timestep_sharing: bool | None = None) -> tuple[torch.Tensor, Metrics]:
        """``gen.dmd_weight * L_dm + gen.gan_weight * L_G`` at the evaluation point of a random step
        ``i`` drawn from ``gen.steps``: steps ``1..i-1`` by ``gen.rollout`` without gradients, step ``i``
        by ``gen.trained`` with gradients, the teacher (CFG) and the frozen critic at ``x_tau``
        (``gan=False`` leaves out ``L_G``)."""
        cfg, b = self.cfg, self.cfg.batch_size
        dmd_cfg = cfg.dmd if timestep_sharing is None else replace(cfg.dmd, timestep_sharing=timestep_sharing)
        r = self._random(step, gen.stream, b)
        full, scond = self._cond(self._prompts(self.prompt_sampler, self.source.prompts, b), r)
        noise, eps = r.randn(*self.shape).to(self.dev), r.randn(*self.shape).to(self.dev)
        if gen.steps is None:
            k_all = r.randint_global(self.k)
        else:
            k_all = torch.tensor(gen.steps)[r.randint_global(len(gen.steps))]
        k_idx = k_all[r.sl].to(self.dev)
        pts = evaluation_times(k_idx, self.schedule, dmd_cfg, r.rand().to(self.dev), r.rand().to(self.dev))
        with self.acc.autocast():
            x_i = rollout_to_step(gen.rollout, noise, self.schedule, scond, k_idx, steps=int(k_all.max()))
            t_i = times_at(self.schedule, k_idx)
            v = predict_velocity(gen.trained, x_i, t_i, scond).to(x_i.dtype)
            x_tau, x0_hat = evaluation_point(x_i, v, t_i, pts, eps)
            with torch.no_grad():
                uncond = self.cond.uncond(x_i.shape[0], self.dev)
                v_real = guided_velocity(self.m.teacher, x_tau.detach(), pts.tau, full, uncond, cfg.guidance)
            fcond = self.fake_cond(full, scond)
            with params_frozen(self.critic), checkpointing_off(self.critic.fake):
                if cfg.gan.enabled:
                    v_fake, logits = self.critic(x_tau, pts.tau, fcond, features=True)
                else:
                    with torch.no_grad():
                        v_fake, logits = self.critic(x_tau.detach(), pts.tau, fcond)
        dm = dmd_loss(x0_hat, x_tau, pts.tau, v_real, v_fake.detach())
        g_loss = gan_g_loss(cfg.gan.loss, logits) if (logits and gan) else torch.zeros((), device=self.dev)
        loss = gen.dmd_weight * dm.loss + gen.gan_weight * g_loss
        return loss, {"dmd_loss": dm.loss.detach(), "dmd_grad_norm": dm.grad_norm.detach(), "g_loss": g_loss.detach(),
                      "x0_std": x0_hat.detach().float().std()}

    # -- results ----------------------------------------------------------------------------------
    def ema_samples(self, prompts: list[str], branches: bool) -> np.ndarray:
        """Images of the EMA student, or (``branches``) of the EMA branches with each step routed to
        its branch, ``memory.probe_batch`` at a time; the trained weights are restored afterwards."""
        pairs = list(zip(self.branch_emas, self.branches)) if branches else [(self.ema, self.student)]
        for ema, mod in pairs:
            ema.store(mod.parameters())
            ema.copy_to(mod.parameters())
        try:
            with sampling_transformer(self.m.pipe, pairs[0][1]):
                return generate(self.m.pipe, prompts, list(range(len(prompts))), self.schedule, guidance=1.0,
                                transformer=self.router if branches else self.student,
                                batch_size=self.cfg.memory.probe_batch,
                                encoder=lambda ps: self.cond.full(ps, self.dev))
        finally:
            for ema, mod in pairs:
                ema.restore(mod.parameters())

    def ema_student(self) -> torch.nn.Module:
        """The student module with its EMA weights copied in (at the end of a run)."""
        student = self.acc.unwrap_model(self.student_p)
        self.ema.copy_to(student.parameters())
        return student

    def branch_results(self) -> list[torch.nn.Module]:
        """The branches with their EMA weights; empty without stage 2."""
        if not self.split_on:
            return []
        out = []
        for branch_p, ema in zip(self.branches_p, self.branch_emas):
            branch = self.acc.unwrap_model(branch_p)
            ema.copy_to(branch.parameters())
            out.append(branch)
        return out


@contextmanager
def sampling_transformer(pipe, module: torch.nn.Module) -> Iterator[None]:
    """``pipe.transformer`` is ``module`` inside the block (the sampler takes the latent dtype and
    size from it: the student's, not a 16-bit teacher's)."""
    saved = pipe.transformer
    pipe.transformer = module
    try:
        yield
    finally:
        pipe.transformer = saved
