"""A pipeline folder from the newest checkpoint of a pretraining run that is still going.

``sd35flash pretrain --preset NAME --snapshot OUT`` reads the run's work folder and never writes
there, so it is safe while training continues in another process:

1. copy ``vae/final`` and, from the newest complete ``flow/ckpt-N`` (renamed from ``.tmp``, with
   its ``meta.json``), the EMA state and ``meta.json`` into a private temporary folder. A
   checkpoint that the trainer deletes or replaces during the copy is skipped for the next newest;
2. build the teacher pipeline from the run's config and load the EMA weights into it (the EMA
   shadow parameters are in the order of ``FlowModel.parameters()``: transformer, then the three
   text encoders);
3. save it atomically to ``OUT`` with ``pretrain.json`` (config, commit, ``snapshot`` = step and
   checkpoint) and the run's logs under ``training/`` (``flow-metrics.jsonl``, ``vae-metrics.jsonl``,
   ``decoder-metrics.jsonl``), with those of the stages it continues under ``training/init/``.

A finished run is copied as it is (its final pipeline), with the same ``training/`` logs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ..config import to_dict
from ..errors import UserError
from ..models.pipeline_io import save_pipeline
from ..models.registry import resolve_model
from ..paths import git_commit
from ..toy_teacher import INFO_FILE, PretrainConfig, is_finished, load_pretrain_config, teacher_dir
from ..train.checkpoint import CheckpointManager, read_meta
from .run import PRESET_PREFIX, copy_pipeline

#: Logs copied beside the weights: ``training/<name>`` <- ``work/<source>``.
TRAINING_LOGS = {"flow-metrics.jsonl": "flow/metrics.jsonl", "vae-metrics.jsonl": "vae/metrics.jsonl",
                 "decoder-metrics.jsonl": "decoder/metrics.jsonl"}
#: Where the logs of the teacher a run continues (``init``) go, under ``training/``; the one before
#: that is under ``init/init/``, and so on, so a chain of stages keeps its whole curve.
INIT_LOGS = "init/"


def init_logs(cfg: PretrainConfig) -> dict[str, Path]:
    """The training logs of the teachers ``cfg`` continues, as ``{path under training/: file}``: a
    ``preset:NAME`` init's work folder in the cache (never trained here; whatever exists is taken),
    followed down its own ``init``; a shipped or folder init's whole ``training/`` folder (which
    holds its own earlier stages). Empty without ``init``."""
    out: dict[str, Path] = {}
    prefix = INIT_LOGS
    for _ in range(64):  # a chain of presets; a cycle would be a config error caught elsewhere
        if not cfg.init:
            break
        if cfg.init.startswith(PRESET_PREFIX):
            name = cfg.init[len(PRESET_PREFIX):]
            cfg = load_pretrain_config(name)
            work = teacher_dir(cfg, name) / "work"
            out.update({prefix + dest: work / src for dest, src in TRAINING_LOGS.items() if (work / src).is_file()})
            prefix += INIT_LOGS
            continue
        training = Path(resolve_model(cfg.init)) / "training"
        if training.is_dir():
            out.update({prefix + f.relative_to(training).as_posix(): f
                        for f in sorted(training.rglob("*")) if f.is_file()})
        break
    return out


def _copy_logs(work: Path, cfg: PretrainConfig) -> dict[str, bytes]:
    """The run's own logs and :func:`init_logs`, as ``{"training/<path>": bytes}``."""
    files = {name: work / src for name, src in TRAINING_LOGS.items() if (work / src).is_file()}
    files.update(init_logs(cfg))
    return {f"training/{name}": f.read_bytes() for name, f in files.items()}


def _ema_state(ckpt: Path, dest: Path) -> dict | None:
    """Copy ``ckpt``'s EMA state (the custom checkpoint object holding ``shadow_params``) and
    ``meta.json`` into ``dest``; None when the checkpoint vanished or changed during the copy."""
    try:
        meta = read_meta(ckpt)
        for obj in sorted(ckpt.glob("custom_checkpoint_*.pkl")):
            local = dest / obj.name
            shutil.copyfile(obj, local)
            state = torch.load(local, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "shadow_params" in state:
                if read_meta(ckpt) != meta:  # replaced while we read it
                    return None
                state["step"] = int(meta["step"])
                return state
    except (FileNotFoundError, OSError, RuntimeError, EOFError, ValueError, json.JSONDecodeError):
        return None
    return None


def wall_seconds(metrics: Path) -> float:
    """Training wall time summed over sessions from a ``metrics.jsonl`` whose ``time`` restarts at 0
    when a run is resumed (each session contributes its largest ``time``)."""
    total, last = 0.0, 0.0
    if not metrics.is_file():
        return 0.0
    for line in metrics.read_text().splitlines():
        try:
            t = float(json.loads(line)["time"])
        except (ValueError, KeyError, TypeError):
            continue  # a line being written right now
        if t < last:
            total += last
        last = t
    return round(total + last, 1)


def snapshot(cfg: PretrainConfig, name: str, out: Path) -> Path:
    """Write the pipeline of run ``name`` (config ``cfg``) at its newest checkpoint, EMA weights, to ``out``."""
    from .flow_trainer import FlowModel, build_teacher_pipeline

    root = teacher_dir(cfg, name)
    work = root / "work"
    if is_finished(root / "pipeline"):
        print(f"the {name} run is finished; copying its final pipeline {root / 'pipeline'} and its logs")
        dest = copy_pipeline(root / "pipeline", Path(out))
        for rel, data in _copy_logs(work, cfg).items():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(data)
        return dest
    if not (work / "vae" / "final" / "config.json").is_file():
        raise UserError(f"no pretraining run of preset/config {name!r} has reached the flow stage in {work}; "
                        "start it with `sd35flash pretrain` (or wait for its first flow checkpoint)")
    ckpts = CheckpointManager(work / "flow").all()
    if not ckpts:
        raise UserError(f"the {name} run in {work} has no flow checkpoint yet; wait for the first one "
                        f"(every {cfg.flow.checkpoint_every} steps)")
    with tempfile.TemporaryDirectory(prefix="sd35flash-snapshot-") as tmp:
        tmp_dir = Path(tmp)
        shutil.copytree(work / "vae" / "final", tmp_dir / "vae")
        state = None
        for ckpt in reversed(ckpts):
            state = _ema_state(ckpt, tmp_dir)
            if state is not None:
                break
        if state is None:
            raise UserError(f"no readable flow checkpoint in {work / 'flow'}; retry in a minute")
        logs = _copy_logs(work, cfg)
        for name_ in ("vae-metrics.jsonl", "flow-metrics.jsonl"):  # for the wall times below
            (tmp_dir / name_).write_bytes(logs.get(f"training/{name_}", b""))
        vae = AutoencoderKL.from_pretrained(tmp_dir / "vae")
        vae_metrics_file = work / "vae" / "metrics.json"
        vae_metrics = json.loads(vae_metrics_file.read_text()) if vae_metrics_file.is_file() else {}
        pipe = build_teacher_pipeline(cfg, vae)
        params = list(FlowModel(pipe, cfg.flow.train_text_encoders).parameters())
        shadow = state["shadow_params"]
        if len(shadow) != len(params) or any(s.shape != p.shape for s, p in zip(shadow, params)):
            raise UserError(f"the checkpoint at step {state['step']} in {work / 'flow'} does not match the "
                            f"{name!r} config (different model sizes); snapshot the run with its own config")
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s.to(p.dtype))
        step = int(state["step"])
        info = {"name": name, "fingerprint": cfg.cache_key(), "commit": git_commit(), "config": to_dict(cfg),
                "vae": vae_metrics, "snapshot": {"step": step, "of_steps": cfg.flow.steps, "ema": True,
                                                  "checkpoint": f"ckpt-{step:08d}"},
                "train_wall_seconds": {"vae": wall_seconds(tmp_dir / "vae-metrics.jsonl"),
                                       "flow": wall_seconds(tmp_dir / "flow-metrics.jsonl")}}
        dest = save_pipeline(pipe.to(torch.float32), Path(out),
                             extra_files={INFO_FILE: json.dumps(info, indent=1), **logs})
    print(f"snapshot of the {name} run at flow step {step}/{cfg.flow.steps} (EMA weights): {dest}")
    return dest
