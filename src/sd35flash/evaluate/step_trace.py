"""Per-step trace of a few-step sampler: what the x0 prediction holds after each step.

At step ``i`` (time ``t_i``) the sampler's velocity ``v`` implies the clean image
``x0_hat = x_t - t_i * v``. Decoding ``x0_hat`` and counting the objects in it shows at which step a
sampler commits to its layout, and which step adds an extra object on a single-object prompt (the
students' typical error). The last step's ``x0_hat`` is the sampler's output, since an Euler step to
``t = 0`` lands exactly on it.

    python -m sd35flash.evaluate.step_trace --model DIR [--steps 4 | --schedule 1,0.9,0.75,0.5,0] \
        [--guidance G] [--num 40] --json trace.json [--png strip.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from .. import flow
from ..errors import UserError
from ..imaging import make_grid, save_png
from ..io import atomic_write_text
from ..models.branches import resolve_variant, sampling_transformer
from ..models.pipeline_io import load_pipeline
from ..models.sampling_settings import resolve_sampling
from ..sampling import (
    PromptEmbeds,
    decode_latents,
    encode_prompts,
    guided_velocity,
    latent_shape,
    make_noise,
)
from ..seeds import derive_seed
from ..world import canonical_prompt, split_specs
from ..world.judge import detect, judge


def parse_schedule(text: str) -> list[float]:
    """``"1,0.9,0.75,0.5,0"`` -> descending floats in [0, 1] that end at 0."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--schedule must be comma-separated numbers, got {text!r}") from None
    if len(vals) < 2 or not all(np.isfinite(vals)) or any(not 0.0 <= v <= 1.0 for v in vals):
        raise UserError(f"--schedule needs at least two finite times in [0, 1], got {text!r}")
    if any(a <= b for a, b in zip(vals, vals[1:])) or vals[-1] != 0.0:
        raise UserError(f"--schedule must be strictly descending and end at 0, got {text!r}")
    return vals


def single_object_specs(n: int, split: str = "test"):
    """The first ``n`` single-object specs of ``split`` (the evaluation's own specs, in order)."""
    specs = [s for s in split_specs(split, 5 * n, seed=0) if s.category == "single_object"]
    return specs[:n]


@torch.no_grad()
def trace(pipe, transformer, specs, seeds, schedule, guidance: float, batch_size: int = 32):
    """Decoded ``x0_hat`` after each step for every spec: uint8 array (steps, N, H, W, 3)."""
    schedule = flow.Schedule.of(schedule)
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    size = pipe.transformer.config.sample_size * (2 ** (len(pipe.vae.config.block_out_channels) - 1))
    per_step: list[list[np.ndarray]] = [[] for _ in range(schedule.steps)]
    uncond = encode_prompts(pipe, [""], device=device).to(device=device, dtype=dtype) if guidance > 1 else None
    for start in range(0, len(specs), batch_size):
        chunk = specs[start : start + batch_size]
        cond = encode_prompts(pipe, [canonical_prompt(s) for s in chunk], device=device).to(device=device, dtype=dtype)
        unc = None
        if uncond is not None:
            unc = PromptEmbeds(uncond.embeds.expand(len(chunk), -1, -1), uncond.pooled.expand(len(chunk), -1))
        x = make_noise(latent_shape(pipe, size, size), seeds[start : start + len(chunk)], dtype=dtype, device=device)

        def velocity(i: int, t: float, x: torch.Tensor, cond=cond, unc=unc) -> torch.Tensor:
            model = transformer(i, t) if not isinstance(transformer, torch.nn.Module) else transformer
            return guided_velocity(model, x, t, cond, unc, guidance)

        def keep(i: int, x: torch.Tensor, v: torch.Tensor, x_next: torch.Tensor) -> None:
            per_step[i].append(decode_latents(pipe.vae, flow.x0_from_v(x, v, schedule.times[i])))

        flow.euler_sample(velocity, x, schedule, after_step=keep)
    return np.stack([np.concatenate(p) for p in per_step])


def summarise(images: np.ndarray, specs, schedule) -> dict:
    """Per step: mean object count, share of images with 0 / more than 1 object, judge pass rate."""
    rows = []
    for i, step_imgs in enumerate(images):
        counts = np.array([len(detect(im)) for im in step_imgs])
        ok = np.array([judge(im, s).correct for im, s in zip(step_imgs, specs)])
        rows.append({"step": i + 1, "t": float(schedule[i]), "mean_objects": float(counts.mean()),
                     "share_none": float((counts == 0).mean()), "share_extra": float((counts > 1).mean()),
                     "judge_pass": float(ok.mean()), "judge_pass_se": float(ok.std() / np.sqrt(len(ok)))})
    return {"num_images": int(images.shape[1]), "schedule": [float(t) for t in schedule], "steps": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sd35flash.evaluate.step_trace", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--schedule", help="explicit times, e.g. 1,0.9,0.75,0.5,0 (overrides --steps)")
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--num", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", required=True)
    ap.add_argument("--png", help="strip: one column per step, first 8 prompts")
    args = ap.parse_args(argv)
    try:
        if not 1 <= args.num <= 2000:
            raise UserError(f"--num must be in 1..2000, got {args.num}")
        if args.guidance is not None and not (np.isfinite(args.guidance) and 0 <= args.guidance <= 100):
            raise UserError(f"--guidance must be a finite number in [0, 100], got {args.guidance}")
        pipe = load_pipeline(args.model)
        schedule, _, guidance = resolve_sampling(pipe, args.model, args.steps, args.guidance)
        if args.schedule:
            schedule = parse_schedule(args.schedule)
        transformer = sampling_transformer(pipe, args.model, resolve_variant(args.model, "auto"))
        specs = single_object_specs(args.num)
        seeds = [derive_seed(args.seed, i) for i in range(len(specs))]
        images = trace(pipe, transformer, specs, seeds, schedule, guidance)
        result = {"model": args.model, "guidance": guidance, **summarise(images, specs, schedule)}
        atomic_write_text(Path(args.json), json.dumps(result, indent=1, allow_nan=False))
        if args.png:
            k = min(8, len(specs))
            cells = [images[i, j] for j in range(k) for i in range(images.shape[0])]
            caps = [f"t={schedule[i]:.2f}" for _ in range(k) for i in range(images.shape[0])]
            save_png(Path(args.png), make_grid(np.stack(cells), cols=images.shape[0], scale=2, captions=caps))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in result["steps"]:
        print(f"step {r['step']} (t={r['t']:.3f}): objects {r['mean_objects']:.2f}, none {r['share_none']:.2f}, "
              f"extra {r['share_extra']:.2f}, judge {r['judge_pass']:.2f} +- {r['judge_pass_se']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
