"""A distillation run: the method (:class:`.method.FlowDMD`) on the generic training loop.

:class:`DistillTrainer` wires the pieces together and owns the run's life cycle: it prepares the
method, registers the checkpointed state (in a fixed order, so checkpoints resume exactly), restores
a checkpoint, then hands the method's stages to :class:`~sd35flash.train.loop.TrainLoop` with the
hooks of a distillation run: the student's EMA (stages 0-1), the probes with the collapse alarm,
sample grids and checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from ..errors import UserError
from ..imaging import make_grid, save_png
from ..train.alarms import CollapseDetector
from ..train.checkpoint import CheckpointManager, read_meta, saved_models
from ..train.ema import EMAHook
from ..train.logger import RunLogger
from ..train.loop import CheckpointHook, Hook, TrainLoop, every
from ..world import judge
from .config import DistillConfig
from .grad_variance import GradVarianceHook
from .method import FlowDMD
from .models import DistillModels
from .prompts import PromptSource
from .real import RealBank
from .trajectory import TrajectoryBank


def checkpoint_branches(path: Path) -> int:
    """How many split-timestep branches checkpoint ``path`` holds: its meta's ``branches``, or for a
    checkpoint written before that was recorded, the models beyond the student and the critic."""
    meta = read_meta(path)
    if "branches" in meta:
        return int(meta["branches"])
    return max(0, saved_models(path) - 2)


class ProbeHook(Hook):
    """EMA samples of fixed probe prompts: pixel std (and, for shapes prompts, judge alignment), each
    watched by a :class:`CollapseDetector`. Runs on every process (same weights, same numbers), so a
    collapse stops all of them; also at step 0 of a fresh run."""

    def __init__(self, cfg: DistillConfig, method: FlowDMD) -> None:
        self.cfg, self.method = cfg, method
        self.pixel_alarm = CollapseDetector("probe pixel std", cfg.collapse_ratio, cfg.collapse_patience)
        self.align_alarm = CollapseDetector("probe alignment", cfg.collapse_ratio, cfg.collapse_patience)

    def on_start(self, step: int, log: RunLogger) -> None:
        if step == 0:
            self.probe(0, log)

    def on_step_end(self, done: int, total: int, values: dict[str, float], log: RunLogger) -> None:
        if every(self.cfg.probe_every, done, total):
            self.probe(done, log)

    def probe(self, step: int, log: RunLogger) -> None:
        if self.cfg.probe_images < 1:
            return
        prompts, specs = self.method.probe_prompts()
        imgs = images_at(self.method, prompts, step)
        vals = {"probe/pixel_std": float(imgs.astype(np.float32).std() / 255.0)}
        if specs is not None:
            vals["probe/alignment"] = float(np.mean([judge(im, s).correct for im, s in zip(imgs, specs)]))
        log.scalars(step, vals, show=False)
        self.pixel_alarm.update(step, vals["probe/pixel_std"])
        if specs is not None:
            self.align_alarm.update(step, vals["probe/alignment"])


class GridHook(Hook):
    """A captioned grid of 8 EMA samples every ``sample_every`` steps: sampled by every process (the
    weights may be sharded), written by the main process."""

    def __init__(self, cfg: DistillConfig, method: FlowDMD, work: Path) -> None:
        self.cfg, self.method, self.work = cfg, method, work

    def on_step_end(self, done: int, total: int, values: dict[str, float], log: RunLogger) -> None:
        if not every(self.cfg.sample_every, done, total):
            return
        acc = self.method.acc
        prompts = self.method.probe_prompts()[0][:8]
        images = images_at(self.method, prompts, done)
        if acc.is_main_process:
            grid = make_grid(images, cols=4, scale=2, captions=prompts)
            save_png(self.work / "samples" / f"step{done:07d}.png", grid)
            log.image(done, "samples", grid)
        acc.wait_for_everyone()


def images_at(method: FlowDMD, prompts: list[str], step: int) -> np.ndarray:
    """EMA samples at global step ``step``: of the student, or (inside stage 2) of the branches."""
    return method.ema_samples(prompts, branches=method.split_on and step > method.split_start)


class DistillTrainer:
    """Runs the method's stages, logs, probes, checkpoints; returns the EMA student transformer."""

    def __init__(self, cfg: DistillConfig, models: DistillModels, prompts: PromptSource, work_dir: Path,
                 accelerator: Accelerator, bank: TrajectoryBank | None = None, real: RealBank | None = None,
                 progress: bool = True, stop_at: int | None = None) -> None:
        self.cfg, self.acc = cfg, accelerator
        self.work = Path(work_dir)
        self.progress, self.stop_at = progress, stop_at
        self.method = FlowDMD(cfg, models, prompts, accelerator, bank=bank, real=real)

    @property
    def branches(self) -> list[torch.nn.Module]:
        return self.method.branches

    def _setup(self) -> None:
        """Prepare the method and register every checkpointed object, in checkpoint order."""
        self.method.prepare()
        self.probes = ProbeHook(self.cfg, self.method)
        self.acc.register_for_checkpointing(*self.method.sharding.checkpointed(
            [*self.method.checkpoint_objects(), self.probes.pixel_alarm, self.probes.align_alarm]))

    def _setup_branches(self) -> None:
        """The split-timestep branches, prepared and registered after everything else: when stage 2
        starts, or before a checkpoint that holds them is loaded."""
        self.acc.register_for_checkpointing(*self.method.sharding.checkpointed(self.method.allocate_branches()))
        self.method.ema_to(self.acc.device)

    def _stages(self) -> list:
        """The method's stages; stage 2 first allocates the branches unless a checkpoint did."""
        stages = self.method.stages()
        for st in stages:
            if st.name == "split":
                start = st.begin

                def begin(step: int, start=start) -> None:
                    if not self.method.branches:
                        self._setup_branches()
                    start(step)

                st.begin = begin
        return stages

    def run(self) -> torch.nn.Module:
        cfg, acc, method = self.cfg, self.acc, self.method
        self._setup()
        # the end of stage 1 stays on disk (keep_presplit_checkpoint), so that `--init-from` can
        # start another stage 2 from it; so do the stage-1 points of `student.keep_at` (snapshots)
        keep = [method.split_start] if cfg.split.steps > 0 and cfg.keep_presplit_checkpoint else []
        keep += [cfg.stage1_step(n) for n in cfg.student.keep_at]
        ckpt = CheckpointManager(self.work / "checkpoints", sharded=self.method.sharding.state, milestones=keep)
        step = self.restore(ckpt)
        method.ema_to(acc.device)
        stages = self._stages()
        k = method.k
        hooks: list[Hook] = [
            EMAHook(method.ema, lambda: method.student.parameters(), stages={"trajectory", "dmd"}),
            self.probes, GridHook(cfg, method, self.work),
            GradVarianceHook(method, cfg.grad_variance_every, cfg.grad_variance_batches,
                             method.split_start - cfg.student.steps, method.split_start),
            CheckpointHook(acc, ckpt, cfg.checkpoint_every, self.stop_at,
                           meta=lambda: {"branches": len(method.branches)}),
        ]
        loop = TrainLoop(acc, stages, hooks, log_every=cfg.log_every)
        log = RunLogger(acc, self.work, "distill", total=loop.total, start=step, desc=f"distill {k}-step",
                        config={"student_steps": k, "timestep_sharing": cfg.dmd.timestep_sharing},
                        progress=self.progress)
        log.write(f"distill: {k}-step student, schedule {[round(t, 4) for t in method.schedule]}, "
                  f"guidance {cfg.guidance:g}, "
                  + ", ".join(f"{s.name} {s.steps}" for s in stages) + (f"; resuming at step {step}" if step else ""))
        try:
            loop.run(step, log)
        finally:
            log.close(end_training=False)  # the caller still exports and synchronises
        return method.ema_student()

    def branch_results(self) -> list[torch.nn.Module]:
        """The branches with their EMA weights (after :meth:`run`); empty without stage 2."""
        return self.method.branch_results()

    def restore(self, ckpt: CheckpointManager, path: Path | None = None) -> int:
        """Restore checkpoint ``path`` (default: the newest) after :meth:`_setup` and return its step
        (0 without one). The stage-2 branches are prepared before it is loaded when it holds them;
        otherwise they are allocated when stage 2 starts (:meth:`_stages`), which starts them from
        the stage-1 EMA student anyway. A checkpoint before stage 2 holds none (also the end of stage
        1 of a run without stage 2, copied in by ``distill --init-from``)."""
        m = self.method
        latest = path or ckpt.latest()
        held = m.split_on and latest is not None and checkpoint_branches(latest) > 0
        if held:
            self._setup_branches()
        step = ckpt.load(self.acc, latest)
        if m.split_on and not held and step > m.split_start:
            raise UserError(f"checkpoint {latest} is past the start of stage 2 (step {m.split_start}) but has no "
                            "split-timestep branches; it does not belong to this config")
        return step
