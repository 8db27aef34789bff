"""Collect a distillation scaling curve: alignment against student updates x batch, as JSON + PNG.

Reads, for every budget ``S x B`` (student updates x batch size), the run's ``sd35flash eval`` JSON
``<dir>/s<S>-b<B>-test.json`` (and, when present, ``<dir>/s<S>-b<B>.time.json`` with its wall
seconds), and writes ``scaling.json`` (one point per budget, sorted by samples ``S * B``) and
``scaling.png`` (overall alignment and fd_effnet against samples, log x axis) into ``<dir>``.
A teacher eval JSON (``--teacher-json``) is drawn as a horizontal reference line.

Usage: python bench/distill_scaling.py DIR [--teacher-json FILE]
       python bench/distill_scaling.py --wall WORK S   (prints {"wall_seconds": ...}: the logged compute
       time of distillation work folder WORK up to its step after S stage-1 updates, summed over the
       sessions of a resumed run)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from sd35flash.io import atomic_write, atomic_write_text

NAME = re.compile(r"^s(\d+)-b(\d+)-test\.json$")


def collect(folder: Path) -> list[dict]:
    """One point per ``s<S>-b<B>-test.json`` in ``folder``: updates, batch, samples, overall, fd_effnet."""
    points = []
    for f in sorted(folder.iterdir()):
        m = NAME.match(f.name)
        if not m:
            continue
        s, b = int(m.group(1)), int(m.group(2))
        res = json.loads(f.read_text())
        timing = folder / f"s{s}-b{b}.time.json"
        points.append({"student_updates": s, "batch_size": b, "samples": s * b,
                       "overall": overall(res),
                       "fd_effnet": res.get("fd_effnet"), "num_images": res.get("num_images"),
                       "wall_seconds": json.loads(timing.read_text())["wall_seconds"] if timing.is_file() else None})
    return sorted(points, key=lambda p: (p["samples"], p["student_updates"]))


def wall_seconds(work: Path, updates: int) -> float:
    """Seconds the run in ``work`` took to reach the end of its ``updates``-th stage-1 update, from
    the ``time`` column of its metrics log, which restarts at 0 in every session of a resumed run:
    each session contributes the time of its last row at or before that step (the work a session
    redid after its checkpoint counts too: it was spent)."""
    from sd35flash.config import from_dict
    from sd35flash.distill.config import DistillConfig

    meta = json.loads((work / "config.json").read_text())
    step = from_dict(DistillConfig, meta["config"], where=str(work / "config.json")).stage1_step(updates)
    total, last, prev = 0.0, 0.0, -1.0
    for line in (work / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        t = float(row.get("time", 0.0))
        if t < prev:  # a new session
            total, last = total + last, 0.0
        prev = t
        if row.get("step", 0) <= step:
            last = t
    return round(total + last, 1)


def overall(res: dict) -> float:
    return float(res["alignment"]["overall"] if "alignment" in res else res["overall"])


def plot(points: list[dict], teacher: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    xs = [p["samples"] for p in points]
    ax1.plot(xs, [p["overall"] for p in points], "o-", label="4-step student")
    fds = [(p["samples"], p["fd_effnet"]) for p in points if p["fd_effnet"] is not None]
    if fds:
        ax2.plot(*zip(*fds), "o-", label="4-step student")
    if teacher is not None:
        ax1.axhline(overall(teacher), color="gray", ls="--", label="teacher")
        if teacher.get("fd_effnet") is not None:
            ax2.axhline(teacher["fd_effnet"], color="gray", ls="--", label="teacher")
    for ax, name in ((ax1, "overall alignment (test)"), (ax2, "fd_effnet (test)")):
        ax.set_xscale("log")
        ax.set_xlabel("student updates x batch (samples)")
        ax.set_ylabel(name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), "scaling plot")
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?")
    ap.add_argument("--teacher-json")
    ap.add_argument("--wall", nargs=2, metavar=("WORK", "S"))
    args = ap.parse_args(argv)
    if args.wall:
        print(json.dumps({"wall_seconds": wall_seconds(Path(args.wall[0]), int(args.wall[1]))}))
        return 0
    if args.folder is None:
        ap.error("give the results folder (or --wall WORK S)")
    folder = Path(args.folder)
    points = collect(folder) if folder.is_dir() else []
    if not points:
        print(f"error: no s<S>-b<B>-test.json eval results in {folder}", file=sys.stderr)
        return 2
    teacher = json.loads(Path(args.teacher_json).read_text()) if args.teacher_json else None
    out = {"points": points, "teacher": None if teacher is None else
           {"overall": overall(teacher), "fd_effnet": teacher.get("fd_effnet")}}
    atomic_write_text(folder / "scaling.json", json.dumps(out, indent=1))
    plot(points, teacher, folder / "scaling.png")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
