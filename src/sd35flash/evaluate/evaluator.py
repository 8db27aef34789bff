"""``sd35flash eval``: generate images for specs, judge them, FD against renders, time it."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import flow
from ..errors import UserError
from ..imaging import make_grid, save_png
from ..io import atomic_write_json, atomic_write_text, to_json
from ..models.branches import param_bytes, resolve_variant, sampling_transformer
from ..models.pipeline_io import load_pipeline
from ..models.sampling_settings import resolve_sampling
from ..sampling import generate, scheduler_schedule
from ..seeds import derive_seed
from ..world import canonical_prompt, render, split_specs
from ..world.spec import SceneSpec, read_jsonl
from .alignment import alignment_scores, judge_all

#: Render seeds for FD reference images (fixed, so every model is compared to the same set).
REFERENCE_SEED = 5_000_000


@dataclass
class EvalRequest:
    model: str
    steps: int | None = None
    guidance: float | None = None
    split: str | None = None
    specs_file: str | None = None
    num_images: int = 200
    seed: int = 0
    batch_size: int = 32
    use_t5: bool = True
    fd: bool = True
    revision: str | None = None
    device: str = "cpu"
    variant: str = "auto"  # split-timestep students: merged | unmerged | presplit (models.branches)
    schedule: str | None = None  # None (the model's own) | "scheduler" | "uniform" | "1,0.9,0.75,0.5,0"


def load_specs(split: str | None, specs_file: str | None, n: int) -> list[SceneSpec]:
    """The specs to evaluate: ``n`` from a split, or the lines of a JSONL file in order, cycling."""
    if n < 1:
        raise UserError(f"--num-images must be >= 1, got {n}")
    if (split is None) == (specs_file is None):
        raise UserError("pass exactly one of --split or --specs")
    if split is not None:
        return split_specs(split, n, seed=0)
    lines = read_jsonl(specs_file)
    return [lines[i % len(lines)] for i in range(n)]


def parse_schedule(text: str) -> list[float] | str:
    """``--schedule``: a keyword (``scheduler`` | ``uniform``) or an explicit list of times
    ``t_1 > t_2 > ... > t_{K+1} = 0`` with every ``t`` in [0, 1]."""
    text = text.strip()
    if text in ("scheduler", "uniform"):
        return text
    try:
        times = [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--schedule {text!r}: expected 'scheduler', 'uniform' or comma-separated numbers "
                        "such as 1,0.9,0.75,0.5,0") from None
    if len(times) < 2:
        raise UserError(f"--schedule {text!r}: needs at least two times (one step), e.g. 1,0")
    if any(not 0.0 <= t <= 1.0 for t in times):
        raise UserError(f"--schedule {text!r}: every time must lie in [0, 1]")
    if any(a <= b for a, b in zip(times, times[1:])):
        raise UserError(f"--schedule {text!r}: times must be strictly descending")
    if times[-1] != 0.0:
        raise UserError(f"--schedule {text!r}: the last time must be 0 (the data end)")
    return times


def apply_schedule(pipe, spec: str, steps: int | None, default_steps: int) -> tuple[flow.Schedule, int]:
    """The schedule ``--schedule spec`` asks for, and its step count (``steps`` must agree with a list)."""
    parsed = parse_schedule(spec)
    if isinstance(parsed, list):
        if steps is not None and steps != len(parsed) - 1:
            raise UserError(f"--steps {steps} disagrees with --schedule {spec} ({len(parsed) - 1} steps); "
                            "drop --steps")
        return flow.Schedule(tuple(parsed)), len(parsed) - 1
    n = steps or default_steps
    if parsed == "scheduler":
        return scheduler_schedule(pipe, n), n
    return flow.sampling_schedule(n, float(pipe.scheduler.config.get("shift", 3.0))), n


def evaluate(req: EvalRequest, json_out: str | Path, save_images: str | Path | None = None,
             pipe=None, progress: bool = True, encoder=None, size: int | None = None,
             extra: dict | None = None) -> dict:
    """Run one evaluation and write ``json_out`` (and a grid PNG beside it) atomically.

    ``encoder`` (a ``text.encoder.PromptEncoder``) and ``size`` come from a device preset;
    ``extra`` is merged into the result (e.g. the preset)."""
    specs = load_specs(req.split, req.specs_file, req.num_images)
    if pipe is None:
        pipe = load_pipeline(req.model, revision=req.revision, device=req.device)
    schedule, steps, guidance = resolve_sampling(pipe, req.model, req.steps, req.guidance)
    if req.schedule is not None:
        schedule, steps = apply_schedule(pipe, req.schedule, req.steps, steps)
    variant = resolve_variant(req.model, req.variant)
    model = sampling_transformer(pipe, req.model, variant)
    prompts = [canonical_prompt(s) for s in specs]
    seeds = [derive_seed(req.seed, i) for i in range(len(specs))]
    bar = tqdm(total=len(specs), desc=f"generate ({steps} steps)", disable=not progress, leave=False)
    t0 = time.perf_counter()
    if encoder is not None:
        encoder.preload(prompts + ([""] if guidance > 1.0 else []))
    with torch.inference_mode():
        images = generate(pipe, prompts, seeds, schedule, guidance=guidance, use_t5=req.use_t5, name=str(req.model),
                          batch_size=req.batch_size, progress=bar.update, transformer=model, encoder=encoder,
                          height=size, width=size)
    seconds = time.perf_counter() - t0
    bar.close()
    verdicts = judge_all(images, specs)
    result: dict = {
        "model": str(req.model),
        "split": req.split,
        "specs": str(req.specs_file) if req.specs_file else None,
        "num_images": len(specs),
        "steps": steps,
        "guidance": guidance,
        "schedule": schedule.to_list(),
        "use_t5": req.use_t5,
        "variant": variant,
        "transformer_bytes": param_bytes(model),
        "seed": req.seed,
        "alignment": alignment_scores(verdicts, specs),
        "seconds_per_image": seconds / len(specs),
        "nfe_per_image": steps * (2 if guidance > 1.0 else 1),
        "batch_size": req.batch_size,
        "device": str(pipe._execution_device),
        "torch_threads": torch.get_num_threads(),
        **(extra or {}),
    }
    if req.fd:
        from .fd import FDScorer

        refs = np.stack([render(s, seed=REFERENCE_SEED + i) for i, s in enumerate(specs)])
        result["fd_effnet"] = None
        if len(specs) >= 2:  # with its sampling error on these specs and the part that is a mean shift
            fd = FDScorer().fd_with_error(refs, images)
            result.update(fd_effnet=fd["fd"], fd_effnet_se=fd["se"], fd_effnet_mean_term=fd["mean_term"])
    json_out = Path(json_out)
    grid_path = json_out.with_suffix(".png")
    n = min(len(images), 40)
    marks = ["[ok] " if v.correct else "[X] " for v in verdicts[:n]]
    save_png(grid_path, make_grid(images[:n], cols=8, scale=2, caption_width=150,
                                  captions=[m + p for m, p in zip(marks, prompts[:n])]))
    result["grid"] = str(grid_path)
    if save_images is not None:
        write_image_folder(Path(save_images), images, specs, prompts, seeds, verdicts)
        result["images_dir"] = str(save_images)
    result = finite_json(result)
    atomic_write_json(json_out, result, "evaluation JSON")
    return result


def finite_json(value, path: str = ""):
    """``value`` with every NaN/inf float replaced by ``None`` (JSON ``null``), each named in a
    one-line warning on stderr, so the file is valid JSON. (Non-finite images never get this far:
    :func:`~sd35flash.sampling.generate` refuses them.)"""
    if isinstance(value, float) and not math.isfinite(value):
        print(f"sd35flash: warning: {path or 'value'} is {value}; written as null", file=sys.stderr)
        return None
    if isinstance(value, dict):
        return {k: finite_json(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def write_image_folder(folder: Path, images: np.ndarray, specs, prompts, seeds, verdicts) -> None:
    """Every image as a PNG plus ``manifest.jsonl`` (file, spec, prompt, seed, verdict) for re-judging."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (im, s, p, sd, v) in enumerate(zip(images, specs, prompts, seeds, verdicts)):
        name = f"{i:05d}.png"
        save_png(folder / name, im)
        lines.append(to_json({"file": name, "spec": s.to_dict(), "prompt": p, "seed": sd,
                                 "correct": v.correct, "checks": v.checks}, indent=None))
    atomic_write_text(folder / "manifest.jsonl", "\n".join(lines) + "\n")
