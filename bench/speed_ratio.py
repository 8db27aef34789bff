"""End-to-end speed of a few-step student against its CFG teacher, measured back to back in one process.

Each round times, for both models, the generation of the same prompts and seeds (text encoding,
sampling and VAE decoding: everything `sd35flash eval` times) at batch size 1 (latency) and at the
eval batch size (throughput). Rounds alternate teacher and student, so slow drifts of a shared
machine hit both; the first round is a warm-up and is not counted. Reported: the median seconds per
image of each model and their ratio.

Usage: python bench/speed_ratio.py --teacher DIR --student DIR [--teacher-steps 28 --guidance G]
       [--prompts 8 --rounds 4 --batch 32] --json OUT
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from sd35flash.io import atomic_write_text
from sd35flash.models.pipeline_io import load_pipeline
from sd35flash.models.sampling_settings import resolve_sampling
from sd35flash.paths import git_commit
from sd35flash.sampling import generate
from sd35flash.world import canonical_prompt, split_specs


def timed(pipe, prompts, schedule, guidance, batch) -> float:
    t0 = time.perf_counter()
    generate(pipe, prompts, list(range(len(prompts))), schedule, guidance=guidance, batch_size=batch)
    return (time.perf_counter() - t0) / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--teacher-steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per timed batch-1 pass")
    ap.add_argument("--batch", type=int, default=32, help="batch size of the throughput pass")
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds after one warm-up round")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    models = {}
    for name, folder, steps, g in (("teacher", a.teacher, a.teacher_steps, a.guidance),
                                   ("student", a.student, None, None)):
        pipe = load_pipeline(folder)
        schedule, k, guidance = resolve_sampling(pipe, folder, steps, g)
        models[name] = (pipe, schedule, k, guidance)
    specs = split_specs("test", max(a.prompts, a.batch), seed=5)
    prompts = [canonical_prompt(s) for s in specs]
    times = {n: {"batch1": [], f"batch{a.batch}": []} for n in models}
    for r in range(a.rounds + 1):
        for n, (pipe, schedule, _, g) in models.items():
            b1 = timed(pipe, prompts[: a.prompts], schedule, g, 1)
            bb = timed(pipe, prompts[: a.batch], schedule, g, a.batch)
            if r > 0:
                times[n]["batch1"].append(b1)
                times[n][f"batch{a.batch}"].append(bb)
            print(f"round {r}{' (warm-up)' if r == 0 else ''} {n}: {b1:.4f} s/img at batch 1, "
                  f"{bb:.4f} at batch {a.batch}")
    out = {"command": "python bench/speed_ratio.py "
                      + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()),
           "commit": git_commit(), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
           "rounds": a.rounds}
    for n, (_, _, k, g) in models.items():
        out[n] = {"steps": k, "guidance": g, "nfe": k * (2 if g > 1.0 else 1),
                  **{f"seconds_per_image_{key}": statistics.median(v) for key, v in times[n].items()}}
    for key in ("batch1", f"batch{a.batch}"):
        out[f"ratio_{key}"] = out["student"][f"seconds_per_image_{key}"] / out["teacher"][f"seconds_per_image_{key}"]
    atomic_write_text(Path(a.json), json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
