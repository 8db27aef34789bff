"""The EMA student of a distillation run after ``n`` stage-1 updates, as a student folder: the points
of a scaling curve (alignment against student updates x batch) from one long run (issue 11, item 2)::

    sd35flash distill ... --set student.steps=900 --set student.keep_at=[75,150,300,600]
    python -m sd35flash.distill.snapshot WORK --updates 75 150 300 600 --out-dir SNAPSHOTS

``WORK`` is the run's work folder (``sd35flash distill`` prints it). Each ``n`` needs the checkpoint
at global step ``trajectory.steps + fake.warmup_steps + n``, which ``student.keep_at`` keeps (and the
newest one, when the run stopped there). The student's LR is constant after its warm-up, so the
snapshot after ``n`` updates is the student a run with ``student.steps: n`` (and no stage 2) ends
with. Each lands in ``OUT_DIR/u<n>`` (a standard student folder: ``sd35flash eval --model`` reads it),
written atomically; a folder that is already there is kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import to_dict
from ..errors import UserError
from ..io import check_model_output
from ..models.student_folder import export_student, student_info
from ..train.checkpoint import CheckpointManager


def snapshot_folder(out_dir: Path, updates: int) -> Path:
    return out_dir / f"u{updates}"


def export_snapshot(work: Path, updates: int, out: Path) -> Path:
    """Write the EMA student of run ``work`` after ``updates`` stage-1 updates to ``out``."""
    from .grad_variance import load_trainer
    from .run import read_work_config

    meta, cfg = read_work_config(work)
    if not 1 <= updates <= cfg.student.steps:
        raise UserError(f"--updates {updates} is outside this run's stage 1 (1..{cfg.student.steps} updates)")
    step = cfg.stage1_step(updates)
    if CheckpointManager(work / "checkpoints").at_step(step) is None:
        raise UserError(f"{work / 'checkpoints'} has no checkpoint after {updates} stage-1 updates (step {step}); "
                        "distil with --set student.keep_at=[...] listing it (and let the run get there)")
    target = check_model_output(out.expanduser().resolve())
    method, _ = load_trainer(work, checkpoint=step)
    models = method.m
    student = models.plain(method.ema_student().to("cpu"))
    models.unpark_encoders()
    info = student_info(cfg.student_schedule(models.shift), meta["teacher"], "snapshot", needs_t5=cfg.t5_dropout == 0.0,
                        extra={"config": to_dict(cfg), "prompts": meta["prompts"], "work_dir": str(work),
                               "snapshot": {"student_updates": updates, "batch_size": cfg.batch_size,
                                            "checkpoint_step": step}})
    export_student(models.pipe, student, target, info)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sd35flash.distill.snapshot",
                                 description="export a distillation run's EMA student after N stage-1 updates "
                                             "(checkpoints kept by student.keep_at)")
    ap.add_argument("work", help="the run's work folder (printed by `sd35flash distill`)")
    ap.add_argument("--updates", type=int, nargs="+", required=True, help="stage-1 update counts")
    ap.add_argument("--out-dir", required=True, help="each snapshot goes to OUT_DIR/u<N>")
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    try:
        for n in args.updates:
            folder = snapshot_folder(out_dir, n)
            if (folder / "model_index.json").is_file():
                print(f"snapshot: {folder} is there already; kept")
                continue
            print(f"snapshot: {export_snapshot(Path(args.work).expanduser(), n, folder)} ({n} updates)")
    except UserError as e:
        print(f"snapshot: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
