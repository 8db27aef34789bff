"""The teacher table of docs/RESULTS.md, in one process (the pipeline is loaded once).

``python -m sd35flash.evaluate.teacher_table TEACHER OUT [--work DIR] [--device cuda]`` (what
``bench/eval_teacher.sh`` runs):

1. guidance sweep on ``val`` at 28 steps (``--guidances``, ``--val-images`` images, no FD);
2. at the best val guidance: ``test`` and ``heldout`` at 28 steps (``--n`` images, seed 0, FD);
3. fair few-step baselines on ``test`` at that guidance, 4 and 2 steps, each on the scheduler's own
   schedule (``scheduler``), on the students' schedule (``uniform``: uniform in t through the
   teacher's shift, what ``distill`` uses) and on METHOD.md's shift-3 lists (``method``:
   1, 0.9, 0.75, 0.5, 0 and 1, 0.75, 0);
4. ``table.md`` (every evaluation in OUT) and ``summary.json``; with the run's training logs (``--work``,
   or the teacher folder's ``training/``), ``training_curve.png`` + ``.json``.

Every evaluation is an ``sd35flash eval`` JSON, named ``val-28-g4.json``, ``test-28.json``,
``heldout-28.json``, ``test-4-uniform.json``, ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..args import integer, number
from ..errors import UserError
from ..io import atomic_write_text
from ..models.pipeline_io import load_pipeline
from ..models.registry import resolve_model
from ..world import CATEGORIES
from .evaluator import EvalRequest, evaluate
from .training_curve import chained_rows, curves, plot, stage_files

#: (steps, --schedule value, label) of the few-step baselines.
BASELINES = ((4, "scheduler", "scheduler"), (4, "uniform", "uniform"), (4, "1,0.9,0.75,0.5,0", "method"),
             (2, "scheduler", "scheduler"), (2, "uniform", "uniform"), (2, "1,0.75,0", "method"))


def read_evals(folder: Path | None) -> list[tuple[str, dict]]:
    """``(file name, result)`` for every evaluation JSON (one with ``alignment``) in ``folder``."""
    if folder is None:
        return []
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of evaluation JSONs")
    out = []
    for p in sorted(folder.glob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("alignment"), dict):
            out.append((p.name, data))
    return out


def _schedule_label(sched) -> str:
    if not sched:
        return ""
    return ", ".join(f"{t:.3g}" for t in sched) if len(sched) <= 6 else f"{len(sched) - 1}-step scheduler"


def metrics_table(evals: list[tuple[str, dict]]) -> str:
    """A Markdown table: one row per evaluation, judge pass rate per category, FD."""
    head = ["file", "split", "images", "steps", "schedule", "guidance", "overall", *CATEGORIES, "fd_effnet"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in evals:
        a = r["alignment"]
        fd = r.get("fd_effnet")
        cells = [name, str(r.get("split") or r.get("specs")), str(r.get("num_images")), str(r.get("steps")),
                 _schedule_label(r.get("schedule")), f"{r.get('guidance')}", f"{a.get('overall', float('nan')):.3f}",
                 *[f"{a[c]:.3f}" if c in a else "" for c in CATEGORIES], f"{fd:.1f}" if fd is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def teacher_table(teacher: str, out: Path, work: Path | None = None, device: str = "cpu", n: int = 400,
                  base_n: int = 400, val_images: int = 100, guidances: tuple[float, ...] = (2, 3, 4, 5, 6),
                  batch_size: int = 32, progress: bool = True, baselines: tuple[str, ...] | None = None) -> dict:
    """Run the whole table for ``teacher`` into ``out``; returns ``summary.json``'s content.
    ``baselines`` keeps only those few-step rows (``"4-uniform"``, ...; None: all of :data:`BASELINES`)."""
    names = [f"{s}-{label}" for s, _, label in BASELINES]
    unknown = sorted(set(baselines or ()) - set(names))
    if unknown:
        raise UserError(f"unknown baselines {', '.join(unknown)}; choose from {', '.join(names)}")
    teacher = resolve_model(teacher)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(teacher, device=device)

    def run(name: str, **kw) -> dict:
        req = EvalRequest(model=teacher, seed=0, batch_size=batch_size, device=device, **kw)
        res = evaluate(req, out / f"{name}.json", pipe=pipe, progress=progress)
        print(f"{name}: overall {res['alignment']['overall']:.3f}, fd_effnet {res.get('fd_effnet')}", flush=True)
        return res

    val = {g: run(f"val-28-g{g:g}", steps=28, guidance=g, split="val", num_images=val_images, fd=False)
           for g in guidances}
    best = max(val, key=lambda g: val[g]["alignment"]["overall"])
    print(f"best guidance on val: {best:g}", flush=True)
    run("test-28", steps=28, guidance=best, split="test", num_images=n)
    run("heldout-28", steps=28, guidance=best, split="heldout", num_images=n)
    for steps, schedule, label in BASELINES:
        if baselines is not None and f"{steps}-{label}" not in baselines:
            continue
        run(f"test-{steps}-{label}", steps=steps, schedule=schedule, guidance=best, split="test", num_images=base_n)
    atomic_write_text(out / "table.md", metrics_table(read_evals(out)) + "\n")
    summary: dict = {"teacher": teacher, "best_guidance_val": best, "table": str(out / "table.md")}
    try:
        files = stage_files(work if work is not None else teacher)
    except UserError:
        files = []
    rows, starts = chained_rows(files)
    series = curves(rows)
    if any(k.startswith("probe/") for k in series):
        plot(series, out / "training_curve.png", str(files[-1]), starts)
        atomic_write_text(out / "training_curve.json", json.dumps(
            {"source": [str(f) for f in files], "stage_starts": starts, "curves": series}, indent=1))
        summary["training_curve"] = str(out / "training_curve.png")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd35flash.evaluate.teacher_table", description=__doc__.splitlines()[0])
    p.add_argument("teacher", help="teacher folder or shipped name")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--work", type=Path, help="the run's work folder (training curve); default: the teacher's training/")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--n", type=integer("--n"), default=400, help="test and heldout images at 28 steps")
    p.add_argument("--base-n", type=integer("--base-n"), default=400, help="test images per few-step baseline")
    p.add_argument("--val-images", type=integer("--val-images"), default=100)
    p.add_argument("--guidances", default="2,3,4,5,6", help="comma-separated guidance scales swept on val")
    p.add_argument("--batch-size", type=integer("--batch-size", hi=2**16), default=32)
    p.add_argument("--baselines", help="only these few-step rows, e.g. 4-uniform,2-method (default: all six)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        parse_guidance = number("--guidances", 0.0, 100.0)
        try:
            guidances = tuple(parse_guidance(g) for g in args.guidances.split(","))
        except argparse.ArgumentTypeError as e:
            raise UserError(str(e)) from None
        teacher_table(args.teacher, args.out, args.work, args.device, args.n, args.base_n, args.val_images, guidances,
                      args.batch_size, progress=not args.no_progress,
                      baselines=tuple(args.baselines.split(",")) if args.baselines else None)
    except UserError as e:
        print(f"teacher_table: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
