"""Pretraining orchestration: cache lookup, VAE stage, flow stage, final pipeline folder.

A teacher is cached under ``<cache>/teachers/<preset>-<config fingerprint>/`` (``work/`` holds
checkpoints, logs and sample grids; ``pipeline/`` the finished model). A finished teacher with the
same fingerprint is always reused, never silently retrained; an unfinished one is continued only
with ``resume=True``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import to_dict
from ..errors import NonFiniteError, TrainingAlarm, UserError
from ..io import atomic_write_json, check_model_output, copy_dir, to_json
from ..models.pipeline_io import save_pipeline
from ..paths import git_commit
from ..toy_teacher import INFO_FILE, PretrainConfig, is_finished, teacher_dir
from ..train.checkpoint import CheckpointManager
from ..train.runtime import make_accelerator
from .flow_trainer import FlowTrainer
from .vae_trainer import VAETrainer


def has_progress(work: Path) -> bool:
    return any(work.glob("vae/ckpt-*")) or any(work.glob("flow/ckpt-*")) or (work / "vae" / "final").is_dir()


def copy_pipeline(src: Path, out: Path) -> Path:
    """Copy a finished pipeline folder to ``out`` atomically (:func:`sd35flash.io.copy_dir`); an
    existing ``out`` is replaced only when it is a model folder or empty."""
    out = out.expanduser().resolve()
    if out == src.resolve():
        return out
    check_model_output(out)
    return copy_dir(src, out, "teacher folder")


def pretrain(cfg: PretrainConfig, out: Path | None, name: str, resume: bool = False, progress: bool = True,
             stop_at: int | None = None) -> Path:
    """Train (or reuse) the teacher for ``cfg`` and return the path of the finished pipeline folder.

    ``stop_at`` stops the flow stage after that step (with a checkpoint) by raising
    :class:`~sd35flash.train.checkpoint.StopTraining`; ``resume=True`` continues from there.
    """
    if out is not None:
        check_model_output(out)  # before any work: a bad --out must not cost a training run
    root = teacher_dir(cfg, name)
    final = root / "pipeline"
    if is_finished(final):
        print(f"reusing the cached teacher {final} (same config fingerprint {cfg.cache_key()})")
        return copy_pipeline(final, out) if out is not None else final
    work = root / "work"
    if has_progress(work) and not resume:
        raise UserError(f"an unfinished pretraining run for this config exists in {work}; "
                        "pass --resume to continue it, or delete that folder to start over")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "config.json", to_dict(cfg))
    t0 = time.time()
    acc = make_accelerator(cfg.runtime, work)
    try:
        vae = VAETrainer(cfg, work, acc, progress).run()
    except (TrainingAlarm, NonFiniteError) as exc:
        raise CheckpointManager(work / "vae").alarm(exc, acc.is_main_process) from None
    vae_metrics = json.loads((work / "vae" / "metrics.json").read_text())
    if acc.is_main_process:
        print(f"VAE: PSNR {vae_metrics['psnr']:.2f} dB, judge accuracy on reconstructions "
              f"{vae_metrics['judge_accuracy']:.3f}")
    try:
        pipe = FlowTrainer(cfg, work, acc, progress, stop_at=stop_at).run(vae)
    except (TrainingAlarm, NonFiniteError) as exc:
        raise CheckpointManager(work / "flow").alarm(exc, acc.is_main_process) from None
    if acc.is_main_process:
        info = {"name": name, "fingerprint": cfg.cache_key(), "commit": git_commit(), "config": to_dict(cfg),
                "vae": vae_metrics, "train_seconds_this_session": round(time.time() - t0, 1),
                "world_size": acc.num_processes}
        save_pipeline(pipe, final, extra_files={INFO_FILE: to_json(info)})
    acc.wait_for_everyone()
    acc.end_training()
    return copy_pipeline(final, out) if out is not None and acc.is_main_process else final
