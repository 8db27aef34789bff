"""``sd35flash demo``: the whole SD3.5-Flash chain on the shapes world, then an HTML report.

1. teacher: the teacher shipped with the package (``quick`` and ``full``; ``sd35flash models``), a
   folder given with ``teacher=`` (``--teacher``), or for ``smoke`` the cached smoke ``pretrain``;
   a missing or damaged shipped teacher is an error, never a silent retraining;
2. 4-step student: ``distill`` (trajectory guidance, DMD + GAN, split-timestep branches, merge at the
   config's ratio; ``full`` then picks the ratio with ``merge-sweep`` on ``val``);
3. 2-step student: a second ``distill`` (stages 0-1 only: with the boundary at t = 0.5 both of its
   times, 1 and 0.75, fall in one branch);
4. ``eval`` on the same ``test`` specs and seeds: teacher at 28 steps (CFG) and at 4 steps (CFG, on
   the 4-step student's own schedule: the fair few-step baseline, since the scheduler's 4-step
   schedule wastes its last step), the 4-step student (merged, unmerged and before the split), the
   2-step student;
5. ``report.html`` (``evaluate.report``) and ``demo.json`` (results and wall time per stage).

Each stage is a library call with its own progress bar; finished stages are reused on a rerun
(cached teacher, finished distillation checkpoints).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .config import merge
from .distill.config import load_distill_config
from .distill.run import distill
from .errors import UserError
from .evaluate.evaluator import EvalRequest, evaluate
from .evaluate.merge_sweep import SweepRequest, merge_sweep, parse_ratios
from .evaluate.report import write_report
from .io import atomic_write_json
from .models.registry import default_teacher as shipped_teacher
from .models.registry import verify_asset
from .models.student_info import read_student_info
from .pretrain.run import pretrain
from .toy_teacher import load_pretrain_config, teacher_dir


@dataclass(frozen=True)
class DemoPreset:
    """``teacher``: pretrain preset, or ``shipped`` (the package's default teacher); ``distill``:
    distill preset; ``num_images``: test images per model; ``sweep``: merge ratios to sweep on
    ``val`` (None: keep the config's ratio); ``unshipped``: the pretrain preset trained (with a
    notice) when this install ships no teacher at all. A shipped teacher that is damaged is always
    an error, never a reason to train."""

    teacher: str
    distill: str
    num_images: int
    sweep: str | None = None
    sweep_images: int = 0
    unshipped: str | None = None


PRESETS = {
    "smoke": DemoPreset("smoke", "smoke", 8),
    "quick": DemoPreset("shipped", "quick", 64, unshipped="quick"),
    "full": DemoPreset("shipped", "default", 200, sweep="0:1:0.1", sweep_images=100, unshipped="default"),
}


class _Clock:
    """Numbered stage headers and wall time per stage."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.seconds = total, 0, {}

    def run(self, name: str, fn):
        self.n += 1
        print(f"[{self.n}/{self.total}] {name}", flush=True)
        t0 = time.perf_counter()
        out = fn()
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        return out


def _teacher(preset: DemoPreset, progress: bool, override: str | None) -> tuple[Path, dict[str, Path]]:
    """(teacher pipeline folder, its training logs for the report: ``{"VAE": ..., "teacher": ...}``)."""
    name = preset.teacher
    if override is not None or preset.teacher == "shipped":
        shipped = shipped_teacher() if override is None else None
        if override is not None or shipped is not None:
            folder = Path(override) if override is not None else verify_asset(shipped)
            return folder, {"VAE": folder / "training" / "vae-metrics.jsonl",
                            "teacher": folder / "training" / "flow-metrics.jsonl"}
        if preset.unshipped is None:
            raise UserError("no teacher is shipped with this install (`sd35flash models` lists none); pass "
                            "--teacher DIR, e.g. a folder from `sd35flash pretrain --preset teacher`")
        name = preset.unshipped
        print(f"demo: this version ships no teacher yet (`sd35flash models` lists none); training the "
              f"'{name}' pretrain preset instead (cached for later runs; --teacher DIR skips this)", flush=True)
    cfg = load_pretrain_config(name)
    work = teacher_dir(cfg, name) / "work"
    folder = pretrain(cfg, None, name, resume=True, progress=progress)
    return folder, {"VAE": work / "vae" / "metrics.jsonl", "teacher": work / "flow" / "metrics.jsonl"}


def run_demo(name: str, out: Path, num_images: int | None = None, progress: bool = True,
             teacher: str | None = None) -> Path:
    """Run preset ``name`` (``smoke`` | ``quick`` | ``full``) into ``out``; returns the report path.
    ``teacher`` (a pipeline folder) replaces the preset's teacher."""
    preset = PRESETS[name]
    n = num_images or preset.num_images
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg4 = load_distill_config(preset.distill)
    cfg2 = merge(cfg4, {"student_steps": 2, "split": {"steps": 0}})
    recipe = f"preset:{preset.distill}"
    clock = _Clock(5 + (preset.sweep is not None))

    label = f"teacher {teacher}" if teacher else ("shipped teacher" if preset.teacher == "shipped"
                                                  else f"teacher ({preset.teacher} preset)")
    teacher, teacher_logs = clock.run(label, lambda: _teacher(preset, progress, teacher))
    s4 = clock.run("4-step student: trajectory guidance, DMD + GAN, split-timestep, merge", lambda: distill(
        cfg4, str(teacher), out / "student-4step", recipe=recipe, resume=True, progress=progress))
    if preset.sweep is not None:
        sweep = clock.run("merge-ratio sweep on val", lambda: merge_sweep(SweepRequest(
            student=str(s4), out=str(out / "merge-sweep"), ratios=parse_ratios(preset.sweep),
            num_images=preset.sweep_images), progress=progress))
        s4 = Path(sweep["chosen_student"])
    s2 = clock.run("2-step student: trajectory guidance, DMD + GAN", lambda: distill(
        cfg2, str(teacher), out / "student-2step", recipe=recipe + " (2 steps, no split)", resume=True,
        progress=progress))

    info4 = read_student_info(s4)
    split = info4.split
    schedule4 = ",".join(repr(float(t)) for t in [*info4.timesteps, 0.0])
    runs = {"teacher-28step": dict(model=teacher, steps=28), "teacher-4step": dict(model=teacher, schedule=schedule4),
            "student-4step": dict(model=s4, variant="merged")}
    if split is not None:
        runs["student-4step-unmerged"] = dict(model=s4, variant="unmerged")
        if split.presplit:
            runs["student-4step-presplit"] = dict(model=s4, variant="presplit")
    runs["student-2step"] = dict(model=s2)

    def evaluate_all() -> dict:
        results = {}
        for key, kw in runs.items():
            req = EvalRequest(model=str(kw["model"]), steps=kw.get("steps"), split="test", num_images=n,
                              variant=kw.get("variant", "auto"), schedule=kw.get("schedule"))
            results[key] = evaluate(req, out / f"eval-{key}.json", save_images=out / "images" / key, progress=progress)
            a = results[key]["alignment"]["overall"]
            print(f"  {key}: alignment.overall {a:.3f}, fd_effnet {results[key].get('fd_effnet')}", flush=True)
        return results

    results = clock.run(f"evaluate {len(runs)} models on {n} test images", evaluate_all)
    metric_files = dict(teacher_logs)
    for key, folder in (("distill 4-step", s4), ("distill 2-step", s2)):
        work = read_student_info(folder).extra.get("work_dir")
        if work:
            metric_files[key] = Path(work) / "metrics.jsonl"
    figures = {"Merge-ratio sweep (val)": out / "merge-sweep" / "sweep.png"} if preset.sweep is not None else {}
    notes = [f"preset {name}: teacher preset {preset.teacher}, distill preset {preset.distill}, {n} test images "
             "per model (same specs and seeds for every model)", f"teacher: {teacher}", f"4-step student: {s4}",
             "teacher-4step: the teacher with CFG on the 4-step student's schedule ("
             + ", ".join(f"{t:.3g}" for t in [*info4.timesteps, 0.0]) + ")",
             f"2-step student: {s2} (stages 0-1; with the split boundary at t = 0.5 both of its times lie in one "
             "branch)"]
    if preset.distill != "default":
        notes.append(f"the {preset.distill} distillation budget is tiny: the students show the pipeline, not the "
                     "method's quality")
    report = clock.run("report", lambda: write_report(out, f"sd35flash demo ({name})", results, metric_files,
                                                      notes=notes, figures=figures, timings=clock.seconds))
    atomic_write_json(out / "demo.json", {"preset": name, "seconds": clock.seconds, "report": str(report),
                                                     "results": results})
    print(f"report: {report}  ({sum(clock.seconds.values()):.0f} s in all)")
    return report
