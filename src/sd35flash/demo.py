"""``sd35flash demo``: the main job on the shapes world.

For now (foundation): train or reuse the toy teacher, evaluate it at 28 steps with CFG and, for
contrast, at 4 steps (the gap distillation must close), on the test and heldout splits, and write
an HTML report.
"""

from __future__ import annotations

from pathlib import Path

from .evaluate.evaluator import EvalRequest, evaluate
from .evaluate.report import write_report
from .pretrain.config import load_pretrain_config
from .pretrain.run import pretrain, teacher_dir

DEMO_IMAGES = {"smoke": 10, "quick": 100, "default": 200}


def run_demo(preset: str, out: Path, num_images: int | None = None) -> Path:
    cfg = load_pretrain_config(preset)
    n = num_images or DEMO_IMAGES.get(preset, 100)
    teacher = pretrain(cfg, None, preset, resume=True)
    out.mkdir(parents=True, exist_ok=True)
    runs = {
        "teacher-28step": dict(steps=28, guidance=None, split="test"),
        "teacher-4step": dict(steps=4, guidance=None, split="test"),
        "teacher-28step-heldout": dict(steps=28, guidance=None, split="heldout"),
    }
    results = {}
    for name, kw in runs.items():
        print(f"evaluating {name} on {n} {kw['split']} images")
        req = EvalRequest(model=str(teacher), num_images=n, **kw)
        results[name] = evaluate(req, out / f"eval-{name}.json", pipe=None)
    work = teacher_dir(cfg, preset) / "work"
    report = write_report(out, f"sd35flash demo ({preset})", results,
                          {"VAE": work / "vae" / "metrics.jsonl", "teacher": work / "flow" / "metrics.jsonl"},
                          notes=[f"teacher: {teacher}"])
    print(f"report: {report}")
    return report
