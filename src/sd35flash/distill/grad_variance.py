"""How noisy is the student's DMD gradient? The timestep-sharing ablation statistic.

At one fixed checkpoint (student, fake model, optimiser states as saved), the student's gradient of
``L_dm`` alone (no GAN term, no optimiser step) is computed on ``B`` minibatches. Each minibatch
draws its own prompts, noise, student steps and evaluation times exactly as training does; both
estimators (timestep sharing on and off) see the *same* prompts and noise.

With ``g_b`` the flattened gradient over every student parameter:

* ``trace_cov = 1/(B-1) sum_b ||g_b - g_mean||^2``: the total variance (trace of the covariance);
* ``mean_sq_norm = 1/B sum_b ||g_b||^2`` and ``mean_grad_sq_norm = ||g_mean||^2``;
* ``relative_variance = trace_cov / mean_sq_norm``: the share of a minibatch gradient's energy that
  is noise. It is scale-free, so estimators with different gradient magnitudes compare fairly
  (about 1 for pure noise, 0 for a deterministic gradient);
* ``mean_cosine``: the mean cosine similarity over pairs of minibatch gradients,
  ``(||sum_b u_b||^2 - B) / (B (B - 1))`` with ``u_b = g_b / ||g_b||``.

``python -m sd35flash.distill.grad_variance --work DIR [--checkpoint N] --batches 16 --json OUT``
reads the run's ``config.json`` (teacher, prompts, config) and checkpoint from its work folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..train.loop import Hook


@dataclass
class GradStats:
    batches: int
    trace_cov: float
    mean_sq_norm: float
    mean_grad_sq_norm: float
    relative_variance: float
    mean_cosine: float


def gradient_statistics(grads: Iterable[torch.Tensor]) -> GradStats:
    """The statistics of the module docstring from flattened gradients, accumulated in float64
    (memory: two parameter-sized vectors, whatever ``B`` is)."""
    total = unit = None
    sq, n = 0.0, 0
    for g in grads:
        g = g.detach().double().flatten()
        norm_sq = float(g.dot(g))
        if total is None:
            total, unit = torch.zeros_like(g), torch.zeros_like(g)
        total += g
        unit += g / max(norm_sq ** 0.5, 1e-30)
        sq += norm_sq
        n += 1
    if n < 2:
        raise ValueError("gradient statistics need at least 2 minibatches")
    mean = total / n
    mean_sq = float(mean.dot(mean))
    trace_cov = max(sq - n * mean_sq, 0.0) / (n - 1)
    cos = (float(unit.dot(unit)) - n) / (n * (n - 1))
    return GradStats(n, trace_cov, sq / n, mean_sq, trace_cov / max(sq / n, 1e-300), cos)


def student_gradients(method, steps: Sequence[int], sharing: bool) -> Iterable[torch.Tensor]:
    """Yield the flattened ``L_dm`` gradient of the student for each step's minibatch, with timestep
    sharing on or off, through the method's public API (:meth:`FlowDMD.student_loss`). The prompt
    sampler is rewound first, so every call sees the same batches."""
    state = copy.deepcopy(method.data_state())
    params = method.student_parameters()
    weight = max(method.cfg.dmd.weight, 1e-30)
    try:
        method.load_data_state(state)
        for step in steps:
            for p in params:
                p.grad = None
            loss, _ = method.student_loss(step, gan=False, timestep_sharing=sharing)
            method.acc.backward(loss / weight)  # L_dm itself
            yield torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    finally:
        for p in params:
            p.grad = None
        method.load_data_state(state)


def measure(method, batches: int = 16, first_step: int = 1_000_000) -> dict[str, dict]:
    """Both estimators on the same ``batches`` minibatches (step seeds ``first_step ...``, which no
    training run reaches, so the draws are fresh)."""
    steps = list(range(first_step, first_step + batches))
    return {name: asdict(gradient_statistics(student_gradients(method, steps, sharing)))
            for name, sharing in (("timestep_sharing", True), ("renoise", False))}


class GradVarianceHook(Hook):
    """Along training: every ``every`` steps of stage 1 (the student's DMD stage), the statistics of
    :func:`gradient_statistics` over ``batches`` fresh minibatches (step seeds ``first_step + done *
    batches ...``), with the run's own timestep-sharing setting, logged as ``gradvar/*`` scalars.
    The training state is untouched: the prompt sampler is rewound and the gradients cleared."""

    def __init__(self, method, every: int, batches: int, first: int, last: int,
                 first_step: int = 2_000_000_000) -> None:
        self.method, self.every, self.batches = method, every, batches
        self.first, self.last, self.first_step = first, last, first_step

    def on_step_end(self, done: int, total: int, values: dict[str, float], log) -> None:
        if self.every <= 0 or not self.first < done <= self.last:
            return
        if (done - self.first) % self.every and done != self.last:
            return
        log.scalars(done, self.measure(done), show=False)

    def measure(self, done: int) -> dict[str, float]:
        steps = [self.first_step + done * self.batches + j for j in range(self.batches)]
        stats = gradient_statistics(student_gradients(self.method, steps, self.method.cfg.dmd.timestep_sharing))
        return {"gradvar/relative_variance": stats.relative_variance, "gradvar/mean_cosine": stats.mean_cosine}


def load_trainer(work: Path, checkpoint: int | None = None):
    """The distillation method (:class:`~sd35flash.distill.method.FlowDMD`) of a run, restored from
    ``work/checkpoints`` (newest, or ``ckpt-<checkpoint>``), and the checkpoint's step."""
    from ..train.checkpoint import CheckpointManager
    from ..train.runtime import make_accelerator
    from .models import DistillModels
    from .prompts import load_prompts
    from .run import read_work_config, real_bank, trajectory_bank
    from .trainer import DistillTrainer
    from .trajectory import teacher_identity

    meta, cfg = read_work_config(work)
    ckpts = CheckpointManager(work / "checkpoints")
    if checkpoint is None:
        path = ckpts.latest()
    else:
        path = next((p for p in ckpts.all() if int(p.name.split("-")[-1]) == checkpoint), None)
    if path is None:
        have = ", ".join(p.name for p in ckpts.all()) or "none"
        raise UserError(f"no checkpoint {checkpoint if checkpoint is not None else ''} in {work / 'checkpoints'} "
                        f"(have: {have})")
    models = DistillModels.for_config(cfg, meta["teacher"])
    source = load_prompts(meta["prompts"], cfg.num_prompts, seed=cfg.runtime.seed)
    acc = make_accelerator(cfg.runtime, work, log_with=None)
    tid = teacher_identity(meta["teacher"], None)
    needs_bank = cfg.trajectory.steps > 0 or (cfg.gan.enabled and cfg.gan.real == "teacher")
    bank = trajectory_bank(cfg, models, source, tid, work, acc, progress=False) if needs_bank else None
    trainer = DistillTrainer(cfg, models, source, work, acc, bank=bank, real=real_bank(cfg, models, source, bank, acc),
                             progress=False)
    trainer._setup()
    step = trainer.restore(ckpts, path)
    return trainer.method, step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sd35flash.distill.grad_variance",
                                 description="variance of the student's DMD gradient, sharing on vs off")
    ap.add_argument("--work", required=True, help="a distillation work folder (holds config.json, checkpoints/)")
    ap.add_argument("--checkpoint", type=int, help="checkpoint step (default: the newest)")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--json", dest="json_out", required=True)
    args = ap.parse_args(argv)
    try:
        if args.batches < 2:
            raise UserError("--batches must be >= 2")
        method, step = load_trainer(Path(args.work).expanduser(), args.checkpoint)
        result = {"work": str(args.work), "checkpoint": step, "batch_size": method.cfg.batch_size,
                  "statistic": "relative_variance = trace(Cov[g]) / E||g||^2 over minibatch gradients of L_dm",
                  **measure(method, args.batches)}
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ..io import atomic_write_json

    atomic_write_json(Path(args.json_out), result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
