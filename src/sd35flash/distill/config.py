"""Typed configuration of distillation (``configs/toy-distill-*.yaml``).

One dataclass per concern: the student schedule and teacher guidance at the top, then one nested
dataclass per loss / stage. Every choice METHOD.md marks [ours] is an option here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .. import flow
from ..config import load_config
from ..errors import ConfigError, UserError
from ..train.runtime import RuntimeConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ("smoke", "quick", "default", "recipe")
STUDENT_STEPS = (1, 2, 4)


@dataclass
class TrajectoryConfig:
    """Stage 0, trajectory guidance (TG): regress each student step onto the teacher's ODE.

    ``loss``: ``x`` compares the Euler step's end state with the teacher's (each step weighted by
    ``dt^2``); ``velocity`` compares the velocity with the teacher's chord ``(x_{t_{i+1}} - x_{t_i}) / dt``
    (every step weighted equally; per step exactly the ``x`` loss divided by ``dt^2``).
    ``teacher_steps`` N must be a multiple of the student's K so that the teacher's shifted-uniform
    N-step schedule passes exactly through every student time. ``num_trajectories`` teacher CFG
    trajectories are generated once and cached on disk (keyed by teacher, prompts and settings).
    """

    steps: int = 150
    teacher_steps: int = 32
    num_trajectories: int = 256
    lr: float = 1e-4
    batch_size: int = 16
    cache: bool = True
    loss: Literal["x", "velocity"] = "x"


@dataclass
class DMDConfig:
    """Stage 1 distribution matching. ``timestep_sharing`` picks the evaluation point on the
    student's own line at a shared timestep; ``false`` is vanilla DMD re-noising with a random
    ``tau`` in ``random_tau_range`` and fresh noise. ``last_step``: what the last student step does
    when no shared timestep lies below ``t_K``: ``renoise`` (fresh noise at a shared timestep from
    ``t_2..t_K``; random ``tau`` when K = 1) or ``midpoint`` (stay on the line at ``t_K / 2``).
    ``tau`` (with sharing): ``next`` evaluates step ``i`` at ``t_{i+1}`` (the last step as ``last_step``
    says); ``below`` draws ``tau`` uniformly in ``(lo, t_i)`` on the student's line for every step
    (``lo`` from ``random_tau_range``), so the last step is read at low noise too.
    ``noise`` (with sharing): ``line`` reads at the point on the student's line (no fresh noise);
    ``fresh`` re-noises the step's ``x0_hat`` with fresh Gaussian noise at the same ``tau``, so the
    teacher and the fake are read on the Gaussian-noised marginals they were trained on."""

    weight: float = 1.0
    timestep_sharing: bool = True
    last_step: Literal["renoise", "midpoint"] = "renoise"
    tau: Literal["next", "below"] = "next"
    noise: Literal["line", "fresh"] = "line"
    random_tau_range: tuple[float, float] = (0.02, 0.98)


@dataclass
class FakeConfig:
    """The fake velocity model: flow matching on detached student samples, ``updates`` per student
    update (two time-scale update rule).

    ``warmup_steps``: steps of critic updates alone (``updates`` each, the student frozen) between
    trajectory guidance and stage 1, so the fake first learns the guided student.
    ``mixture``: ``shared`` trains the fake at the DMD evaluation time of the sample's student step;
    ``uniform_steps`` on the ``x0`` predictions of uniformly drawn student steps at ``tau`` uniform
    in ``dmd.random_tau_range``, independent of the step.
    ``match_student_conditioning``: the fake (trained and queried) sees the student's conditioning,
    T5 dropped where the student's is; otherwise the full conditioning, like the teacher."""

    updates: int = 2
    lr: float = 1e-4
    weight: float = 1.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    mixture: Literal["shared", "uniform_steps"] = "shared"
    match_student_conditioning: bool = False


@dataclass
class GANConfig:
    """Multi-head discriminator on the fake model's block features (hinge loss).

    ``blocks``: indices of transformer blocks to hook (negative counts from the end). ``head``:
    ``conv`` (3x3 conv, GroupNorm, SiLU, 1x1 conv: a logit per latent cell) or ``linear`` (a logit
    per token). ``real``: ``teacher`` (the cached teacher samples of the trajectory stage) or
    ``renders`` (shapes-world renders encoded by the VAE). ``backbone_grad``: whether the
    discriminator loss also trains the fake model's blocks under the hooks (as DMD2 does), its
    gradient there scaled by ``backbone_weight`` (so the backbone sees the D loss at
    ``discriminator_weight * backbone_weight``; the heads at ``discriminator_weight``).
    ``pool``: average each head's logits to one per sample. ``loss``: ``hinge`` or ``softplus``
    (non-saturating: ``L_D = softplus(-D(real)) + softplus(D(fake))``, ``L_G = softplus(-D(fake))``).
    ``tau``: the noise level of the discriminator's real and fake inputs in the critic step:
    ``shared`` (the fake's flow-matching tau) or ``uniform`` (``U(random_tau_range)`` of ``dmd``).
    ``reinit``: ``each`` re-initialises every head with probability ``reinit_prob``; ``one`` picks one
    head at random with that probability.
    ``paired``: the critic step draws its batch from the real bank and makes the fake side's student
    samples for the same prompts. ``num_real``: real samples for ``renders`` (0: every training
    spec, rendered and encoded lazily when first drawn, then cached). ``lr``: the discriminator heads'
    learning rate in the critic's optimiser (0: ``fake.lr``, that of the fake model's blocks)."""

    enabled: bool = True
    blocks: list[int] = field(default_factory=lambda: [-1])
    head: Literal["conv", "linear"] = "conv"
    head_channels: int = 64
    generator_weight: float = 0.01
    discriminator_weight: float = 0.1
    reinit_prob: float = 0.005
    real: Literal["teacher", "renders"] = "teacher"
    num_real: int = 256
    backbone_grad: bool = True
    backbone_weight: float = 1.0
    pool: bool = False
    loss: Literal["hinge", "softplus"] = "hinge"
    tau: Literal["shared", "uniform"] = "shared"
    reinit: Literal["each", "one"] = "each"
    paired: bool = False
    lr: float = 0.0

    RANGES = {"lr": (0.0, 10.0, False)}  # 0: fake.lr


@dataclass
class StudentStageConfig:
    """Stage 1 (DMD + GAN): steps, student optimiser and LR warm-up.

    ``keep_at``: stage-1 update counts whose checkpoints are kept (never pruned), so that
    ``python -m sd35flash.distill.snapshot`` can export the EMA student at each of them. The student's
    LR is constant after its warm-up, so the student after ``n`` of ``steps`` updates is the one a run
    with ``steps: n`` ends with: one long run gives every point of a scaling curve."""

    steps: int = 300
    lr: float = 5e-5
    warmup: int = 20
    grad_clip: float = 1.0
    keep_at: list[int] = field(default_factory=list)


@dataclass
class SplitConfig:
    """Stage 2, split-timestep fine-tuning (METHOD.md, Stage 2). ``steps: 0`` (the default) skips it.

    ``boundaries``: descending times in (0, 1) that cut (0, 1] into K = len + 1 branch ranges,
    branch 0 the noisiest: ``[0.5]`` gives branch 0 = (0.5, 1] and branch 1 = (0, 0.5]. Every branch
    starts from the stage-1 (EMA) student and, for ``steps`` global steps (all branches at every
    step), is trained only on student steps whose time lies in its range, with
    ``dmd_weight * L_dm + gan_weight * L_G`` (the stage-1 losses; ``L_G`` only when ``gan.enabled``)
    at learning rate ``lr``; the fake model and heads keep training as in stage 1 on samples of the
    routed student (each step by its own branch). Each branch keeps an EMA anchored at its start
    weights: ``ema <- ema_decay * ema + (1 - ema_decay) * w`` from the first update, no warm-up.

    Merging (``models.merge``): ``W = sum_b w_b W_b``; for K = 2, ``w = [1 - merge_ratio,
    merge_ratio]`` (ratio 0 = branch 0, ratio 1 = branch 1); for K > 2, ``merge_weights`` (K numbers
    >= 0 summing to 1). ``unmerged``: the student folder's default sampling routes each step to its
    branch instead of using the merged transformer (beyond the paper). ``keep_presplit`` also saves
    the stage-1 student in the folder (``transformer_presplit/``), for before/after comparisons.
    """

    steps: int = 0
    boundaries: list[float] = field(default_factory=lambda: [0.5])
    lr: float = 2e-5
    dmd_weight: float = 1.0
    gan_weight: float = 0.01
    ema_decay: float = 0.99
    merge_ratio: float = 0.3
    merge_weights: list[float] = field(default_factory=list)
    unmerged: bool = False
    keep_presplit: bool = True

    @property
    def num_branches(self) -> int:
        return len(self.boundaries) + 1

    def weights(self) -> list[float]:
        """The merge weights ``w_b``: ``[1 - merge_ratio, merge_ratio]`` for K = 2, else ``merge_weights``."""
        if self.merge_weights:
            return [float(w) for w in self.merge_weights]
        return [1.0 - self.merge_ratio, self.merge_ratio]

    def check(self, gan_enabled: bool) -> None:
        """Called by ``DistillConfig.validate`` (it needs ``gan.enabled``)."""
        b = self.boundaries
        if self.steps < 0:
            raise ConfigError(f"split.steps must be >= 0, got {self.steps}")
        if not b or any(not 0.0 < t < 1.0 for t in b) or any(y >= x for x, y in zip(b, b[1:])):
            raise ConfigError(f"split.boundaries must be descending times in (0, 1), got {b}")
        if not 0.0 <= self.merge_ratio <= 1.0:
            raise ConfigError(f"split.merge_ratio must be in [0, 1], got {self.merge_ratio}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"split.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.merge_weights:
            w = self.merge_weights
            if len(w) != self.num_branches or any(x < 0 for x in w) or abs(sum(w) - 1.0) > 1e-6:
                raise ConfigError(f"split.merge_weights must be {self.num_branches} numbers >= 0 summing to 1, got {w}")
        elif self.num_branches != 2:
            raise ConfigError(f"split.merge_weights must be given for {self.num_branches} branches "
                              "(merge_ratio covers 2 branches only)")
        if self.dmd_weight < 0 or self.gan_weight < 0:
            raise ConfigError("split.dmd_weight and split.gan_weight must be >= 0")
        if self.steps > 0 and self.dmd_weight == 0 and (self.gan_weight == 0 or not gan_enabled):
            raise ConfigError("split: no loss left to train the branches; set split.dmd_weight > 0 "
                              "(or split.gan_weight > 0 with gan.enabled)")


@dataclass
class MemoryConfig:
    """How the models of a run are held; ``distill/README.md`` ("Memory") gives the savings.

    ``teacher_dtype``: the frozen teacher transformer in ``fp32``, ``bf16`` or ``fp16`` (inputs cast
    in, velocities cast back to fp32); student, fake and the text encoders stay as loaded.
    ``gradient_checkpointing``: recompute the trainable transformers' block activations in backward.
    ``optimizer``: ``adamw`` (torch) or ``adamw8bit`` (8-bit states: bitsandbytes on CUDA when
    installed, else torchao's ``AdamW8bit``).
    ``free_finished_optimizers``: drop an optimiser's state when its stage is over (trajectory
    guidance's when stage 1 starts, the student's when stage 2 starts).
    ``ema_device``: ``accelerator`` (with the weights) or ``cpu`` (the EMA copies live in host memory).
    ``probe_batch``: images generated and decoded at once by probes and sample grids.
    ``conditioning``: ``live`` encodes every batch's prompts with the text encoders; ``precompute``
    encodes every prompt the run uses once at the start, then moves the encoders off the device and
    out of the pipeline until export.
    """

    teacher_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    free_finished_optimizers: bool = True
    ema_device: Literal["accelerator", "cpu"] = "accelerator"
    probe_batch: int = 32
    conditioning: Literal["live", "precompute"] = "live"


@dataclass
class LoraSettings:
    """``mode: lora``: rank ``rank`` adapters with scale ``alpha / rank`` on the attention projections
    named in ``targets`` (suffixes of module names in the SD3 transformer)."""

    rank: int = 16
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                        "add_k_proj", "add_v_proj", "to_add_out"])


@dataclass
class DistillConfig:
    """Everything one distillation run needs besides the teacher and the output folder.

    ``schedule``: the K student times, descending with ``t_1 = 1`` and without the final 0; empty
    means the METHOD.md default ``flow.sampling_schedule(K, shift).step_times`` with the teacher's shift.
    ``guidance``: the teacher's CFG scale in every distillation target (trajectories, ``v_real``);
    ``None`` (``guidance: null``) means the teacher's recommended guidance: a shipped teacher's
    registry entry, else 4.0 (:func:`.run.resolve_guidance`).
    ``mode``: ``full`` trains full copies of the teacher (student, fake, branches); ``lora`` trains
    LoRA adapters (``lora``) on one shared frozen base, which with the adapters disabled is the teacher.
    ``t5_dropout``: the rate at which the student's conditioning loses its T5 block (so one student
    serves with and without T5); teacher and fake see the full conditioning (the fake the student's
    with ``fake.match_student_conditioning``).
    ``sharding``: ``ddp`` replicates the models on every process; ``fsdp`` shards student, critic,
    branches and the frozen teacher with FSDP2 per transformer block (``train/sharding.py``; full
    mode only, under ``torchrun``).
    ``resolution``: training images in pixels (square); 0 is the teacher's own size. It sets the
    latent side (``models/resolution.py``: a multiple of VAE x patch, within the position table).
    ``grad_variance_every``: every N steps of stage 1 (0: never), log the relative variance and mean
    pairwise cosine of the student's ``L_dm`` gradient over ``grad_variance_batches`` minibatches
    (``distill/grad_variance.py``) into the run's metrics as ``gradvar/*``.
    ``keep_presplit_checkpoint``: with stage 2, save the training state at the end of stage 1 and
    never prune it, so that ``distill --init-from WORK`` can run other stage-2 settings from it (one
    more checkpoint on disk: student, fake, discriminator and their optimisers).
    """

    student_steps: int = 4
    schedule: list[float] = field(default_factory=list)
    guidance: float | None = 4.0
    batch_size: int = 16
    ema_decay: float = 0.99
    t5_dropout: float = 0.2
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    student: StudentStageConfig = field(default_factory=StudentStageConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    fake: FakeConfig = field(default_factory=FakeConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    num_prompts: int = 4000
    checkpoint_every: int = 100
    sample_every: int = 200
    probe_every: int = 100
    probe_images: int = 16
    collapse_ratio: float = 0.35
    collapse_patience: int = 2
    log_every: int = 10
    grad_variance_every: int = 0
    grad_variance_batches: int = 4
    keep_presplit_checkpoint: bool = True
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    mode: Literal["full", "lora"] = "full"
    sharding: Literal["ddp", "fsdp"] = "ddp"
    resolution: int = 0
    lora: LoraSettings = field(default_factory=LoraSettings)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        if self.student_steps not in STUDENT_STEPS:
            raise ConfigError(f"student_steps must be one of {list(STUDENT_STEPS)}, got {self.student_steps}")
        if self.schedule:
            s = self.schedule
            if len(s) != self.student_steps or abs(s[0] - 1.0) > 1e-9 or any(b >= a for a, b in zip(s, s[1:])) \
                    or s[-1] <= 0:
                raise ConfigError(f"schedule must hold {self.student_steps} descending times in (0, 1] "
                                  f"starting at 1.0, got {s}")
        for name, v in (("batch_size", self.batch_size), ("trajectory.batch_size", self.trajectory.batch_size),
                        ("memory.probe_batch", self.memory.probe_batch),
                        ("fake.updates", self.fake.updates),
                        ("trajectory.teacher_steps", self.trajectory.teacher_steps)):
            if v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        if self.trajectory.teacher_steps % self.student_steps:
            raise ConfigError(f"trajectory.teacher_steps ({self.trajectory.teacher_steps}) must be a multiple of "
                              f"student_steps ({self.student_steps}) so the teacher passes through every student time")
        if not 0.0 <= self.t5_dropout <= 1.0:
            raise ConfigError(f"t5_dropout must be in [0, 1], got {self.t5_dropout}")
        lo, hi = self.dmd.random_tau_range
        if not 0.0 < lo < hi <= 1.0:
            raise ConfigError(f"dmd.random_tau_range must satisfy 0 < lo < hi <= 1, got {[lo, hi]}")
        if self.grad_variance_every < 0 or self.grad_variance_batches < 2:
            raise ConfigError("grad_variance_every must be >= 0 and grad_variance_batches >= 2, got "
                              f"{self.grad_variance_every} and {self.grad_variance_batches}")
        bad = [n for n in self.student.keep_at if not 1 <= n <= self.student.steps]
        if bad:
            raise ConfigError(f"student.keep_at must list update counts in 1..student.steps ({self.student.steps}), "
                              f"got {bad}")
        if self.fake.warmup_steps < 0:
            raise ConfigError(f"fake.warmup_steps must be >= 0, got {self.fake.warmup_steps}")
        if not 0.0 <= self.gan.backbone_weight <= 1.0:
            raise ConfigError(f"gan.backbone_weight must be in [0, 1], got {self.gan.backbone_weight}")
        if self.gan.num_real < 0 or (self.gan.num_real == 0 and self.gan.real == "teacher"):
            raise ConfigError("gan.num_real must be >= 1 (0, all training specs, needs gan.real: renders)")
        if self.dmd.tau != "next" and not self.dmd.timestep_sharing:
            raise ConfigError("dmd.tau: below needs dmd.timestep_sharing: true (without sharing tau is random already)")
        if self.dmd.noise != "line" and not self.dmd.timestep_sharing:
            raise ConfigError("dmd.noise: fresh needs dmd.timestep_sharing: true (without sharing the noise is fresh "
                              "already)")
        if self.gan.enabled and not self.gan.blocks:
            raise ConfigError("gan.blocks must name at least one transformer block when gan.enabled is true")
        self.split.check(self.gan.enabled)
        if self.sharding == "fsdp" and self.mode == "lora":
            raise ConfigError("sharding: fsdp shards full copies of the teacher; LoRA mode replicates its small "
                              "adapters on one frozen base: use --sharding ddp with --mode lora")
        if self.sharding == "fsdp" and self.grad_variance_every > 0:
            raise ConfigError("grad_variance_every reads whole per-process gradients; set it to 0 with --sharding fsdp")
        if self.resolution < 0:
            raise ConfigError(f"resolution must be >= 0 (0: the teacher's own size), got {self.resolution}")
        if self.lora.rank < 1 or self.lora.alpha <= 0 or not self.lora.targets:
            raise ConfigError(f"lora needs rank >= 1, alpha > 0 and at least one target, got rank {self.lora.rank}, "
                              f"alpha {self.lora.alpha}, targets {self.lora.targets}")

    def stage1_step(self, updates: int) -> int:
        """The global step after ``updates`` stage-1 (DMD) updates: stage 0 and the fake warm-up come first."""
        return self.trajectory.steps + self.fake.warmup_steps + updates

    def student_schedule(self, shift: float) -> list[float]:
        """The K student times ``t_1 = 1 > ... > t_K`` (no final 0): the configured list, or K
        uniform points through the teacher's shift, ``flow.sampling_schedule(K, shift).step_times``."""
        if self.schedule:
            return [float(t) for t in self.schedule]
        return flow.sampling_schedule(self.student_steps, shift).step_times

    def branch_steps(self, shift: float) -> list[list[int]]:
        """Per split branch, the indices of the student steps whose time lies in its range; a
        ConfigError when stage 2 is on and some branch would get none (e.g. a 2-step student, times
        1 and 0.75, with the boundary at 0.5)."""
        from ..models.branches import branch_ranges, steps_in_range

        times = self.student_schedule(shift)
        out = [steps_in_range(times, lo, hi) for lo, hi in branch_ranges(self.split.boundaries)]
        if self.split.steps > 0:
            for (lo, hi), steps in zip(branch_ranges(self.split.boundaries), out):
                if not steps:
                    raise ConfigError(f"split branch ({lo:g}, {hi:g}] holds none of the student times "
                                      f"{[round(t, 4) for t in times]}; change split.boundaries or set split.steps: 0")
        return out


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise UserError(f"unknown distill preset '{name}'; choose one of {', '.join(PRESETS)}")
    return CONFIG_DIR / f"toy-distill-{name}.yaml"


def load_distill_config(preset: str | None = None, path: str | None = None) -> DistillConfig:
    """Load a preset by name or a YAML file (``--config``), strictly."""
    if path is not None:
        return load_config(DistillConfig, path)
    return load_config(DistillConfig, preset_path(preset or "default"))
