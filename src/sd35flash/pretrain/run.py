"""Pretraining orchestration: cache lookup, VAE stage (or ``init``), flow stage, optional decoder
fine-tune, final pipeline folder.

A teacher is cached under ``<cache>/teachers/<preset>-<config fingerprint>/`` (``work/`` holds
checkpoints, logs and sample grids; ``pipeline/`` the finished model). A finished teacher with the
same fingerprint is always reused, never silently retrained; an unfinished one is continued only
with ``resume=True``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

from ..config import to_dict
from ..errors import NonFiniteError, TrainingAlarm, UserError
from ..io import atomic_write_json, check_model_output, copy_dir, staged_dir, to_json
from ..models.pipeline_io import load_pipeline, save_pipeline
from ..models.registry import resolve_model
from ..paths import git_commit
from ..toy_teacher import INFO_FILE, PretrainConfig, is_finished, load_pretrain_config, teacher_dir
from ..train.checkpoint import CheckpointManager
from ..train.runtime import make_accelerator
from .decoder_trainer import DecoderTrainer
from .flow_trainer import FlowTrainer
from .vae_trainer import VAETrainer, evaluate_vae

#: ``init: preset:NAME`` continues the finished teacher of preset NAME.
PRESET_PREFIX = "preset:"


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


def init_folder(init: str, resume: bool, progress: bool) -> str:
    """Where ``init`` lives: ``preset:NAME`` is that preset's finished teacher, from the cache or trained
    now (the chain of stages from scratch; an unfinished one continues only with ``resume``); anything
    else is a shipped name (verified against its checksums) or a folder."""
    if init.startswith(PRESET_PREFIX):
        name = init[len(PRESET_PREFIX):]
        print(f"init: the finished teacher of preset {name!r} (reused from the cache, else trained first)")
        return str(pretrain(load_pretrain_config(name), None, name, resume=resume, progress=progress))
    return str(resolve_model(init))


def load_init(cfg: PretrainConfig, folder: str, work: Path, main_process: bool) -> StableDiffusion3Pipeline:
    """The teacher ``cfg.init`` (found in ``folder`` by :func:`init_folder`), in float32 on the CPU.
    The VAE stage is skipped (the latents must stay those the teacher was trained on): the main
    process writes the teacher's VAE to ``work/vae/final`` and its metrics to
    ``work/vae/metrics.json``, as the VAE stage would."""
    pipe = load_pipeline(folder, torch_dtype=torch.float32)
    pipe.vae.eval()
    final, metrics = work / "vae" / "final", work / "vae" / "metrics.json"
    if main_process and not (final / "config.json").is_file():
        with staged_dir(final, "VAE folder") as tmp:  # so that `--snapshot` finds the VAE as usual
            pipe.vae.save_pretrained(tmp)
    if main_process and not metrics.is_file():
        vals = evaluate_vae(pipe.vae, cfg.vae.eval_images, seed=cfg.data_seed + 7, size=cfg.model.image_size)
        atomic_write_json(metrics, {**vals, "init": cfg.init})
    return pipe


def pretrain(cfg: PretrainConfig, out: Path | None, name: str, resume: bool = False, progress: bool = True,
             stop_at: int | None = None) -> Path:
    """Train (or reuse) the teacher for ``cfg`` and return the path of the finished pipeline folder.

    ``stop_at`` stops the flow stage after that step (with a checkpoint) by raising
    :class:`~sd35flash.errors.StopTraining`; ``resume=True`` continues from there.
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
    # before this run's accelerator: a `preset:` init may train (and end) a whole run of its own
    init_path = init_folder(cfg.init, resume, progress) if cfg.init else None
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "config.json", to_dict(cfg))
    t0 = time.time()
    acc = make_accelerator(cfg.runtime, work)
    init = load_init(cfg, init_path, work, acc.is_main_process) if init_path else None
    if init is not None:
        vae = init.vae
    else:
        try:
            vae = VAETrainer(cfg, work, acc, progress).run()
        except (TrainingAlarm, NonFiniteError) as exc:
            raise CheckpointManager(work / "vae").alarm(exc, acc.is_main_process) from None
    acc.wait_for_everyone()
    vae_metrics = json.loads((work / "vae" / "metrics.json").read_text())
    if acc.is_main_process:
        print(f"VAE: PSNR {vae_metrics['psnr']:.2f} dB, judge accuracy on reconstructions "
              f"{vae_metrics['judge_accuracy']:.3f}")
    try:
        pipe = FlowTrainer(cfg, work, acc, progress, stop_at=stop_at).run(vae, init=init)
    except (TrainingAlarm, NonFiniteError) as exc:
        raise CheckpointManager(work / "flow").alarm(exc, acc.is_main_process) from None
    if cfg.decoder.steps > 0:
        try:
            pipe.vae = DecoderTrainer(cfg, work, acc, progress).run(pipe.vae)
        except (TrainingAlarm, NonFiniteError) as exc:
            raise CheckpointManager(work / "decoder").alarm(exc, acc.is_main_process) from None
        vae_metrics = {**vae_metrics, "decoder": json.loads((work / "decoder" / "metrics.json").read_text())}
    if acc.is_main_process:
        info = {"name": name, "fingerprint": cfg.cache_key(), "commit": git_commit(), "config": to_dict(cfg),
                "vae": vae_metrics, "train_seconds_this_session": round(time.time() - t0, 1),
                "world_size": acc.num_processes}
        save_pipeline(pipe, final, extra_files={INFO_FILE: to_json(info)})
    acc.wait_for_everyone()
    acc.end_training()
    return copy_pipeline(final, out) if out is not None and acc.is_main_process else final
