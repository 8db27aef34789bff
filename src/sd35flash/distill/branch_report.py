"""How far split-timestep fine-tuning moved a student's branches, and a copy of the student with the
*raw* (not EMA) branches, so both can be evaluated (issue 11, item 5)::

    python -m sd35flash.distill.branch_report STUDENT --json branches.json [--raw-out STUDENT_RAW]

A split student folder holds the branches' anchored EMAs (``transformer_branch{b}``), the stage-1
student they started from (``transformer_presplit``) and their merge. The raw branches live only in
the run's last checkpoint (the work folder named in the student's ``sd35flash.json``). Distances are
relative to the pre-split weights ``theta_pre``::

    drift_b = ||theta_b - theta_pre|| / ||theta_pre||        gap = ||theta_0 - theta_1|| / ||theta_pre||

for the EMA branches and, when the checkpoint is there, the raw ones. ``--raw-out`` writes the
student folder again with the raw branches and their merge at the folder's own merge weights, so
``sd35flash eval --model STUDENT_RAW --variant merged|unmerged`` measures them. Full-mode students
only (a LoRA student's branches are adapters).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_write_json, check_model_output
from ..models.student_info import read_student_info

DIFFUSION_FILE = "diffusion_pytorch_model.safetensors"


def relative_distances(pre: Mapping[str, torch.Tensor], branches: Sequence[Mapping[str, torch.Tensor]],
                       keys: Sequence[str] | None = None) -> dict[str, float]:
    """``drift{b}`` for every branch and ``gap`` between the first two (module docstring), in float64,
    over the tensors named in ``keys`` (default: all of ``pre``; pass the parameter names to leave
    out fixed buffers such as the position table, which would only inflate ``||theta_pre||``)."""
    keys = list(pre) if keys is None else list(keys)
    missing = [k for b in [pre, *branches] for k in keys if k not in b]
    if missing:
        raise UserError(f"the branches and the pre-split student have different tensors (e.g. {missing[0]!r})")
    pre = {k: pre[k] for k in keys}
    ref = sum(float(t.double().pow(2).sum()) for t in pre.values()) ** 0.5
    if ref == 0.0:
        raise UserError("the pre-split student's weights are all zero; this is not a trained student")

    def dist(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
        return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in pre) ** 0.5 / ref

    out = {f"drift{b}": dist(w, pre) for b, w in enumerate(branches)}
    if len(branches) > 1:
        out["gap"] = dist(branches[0], branches[1])
    return out


def _load(folder: Path, sub: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / sub / DIFFUSION_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {sub}/{DIFFUSION_FILE}; is it a complete split-timestep student?")
    return load_file(str(path))


def parameter_names(subfolder: Path) -> list[str]:
    """The parameter names (no buffers) of the SD3 transformer saved in ``subfolder``, from its config
    alone (built on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    with init_empty_weights():
        model = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(str(subfolder)))
    return [n for n, _ in model.named_parameters()]


def raw_branches(work: Path) -> tuple[list[torch.nn.Module], int, object]:
    """The raw branches of the newest checkpoint of distillation work folder ``work``, the checkpoint's
    step, and the restored method (whose ``m.pipe`` writes a student folder)."""
    from .grad_variance import load_trainer

    method, step = load_trainer(work)
    if not method.branches:
        raise UserError(f"the newest checkpoint in {work / 'checkpoints'} (step {step}) is before stage 2; "
                        "finish the run first")
    return [method.acc.unwrap_model(b) for b in method.branches_p], step, method


def report(student: str | Path, raw_out: str | Path | None = None, use_checkpoint: bool = True) -> dict:
    """The distances of ``student``'s EMA branches (and raw ones, from its run's checkpoint when
    ``use_checkpoint`` and the work folder still exists); with ``raw_out``, the raw student folder."""
    from ..models.merge import merged_transformer
    from ..models.student_folder import export_student

    folder = Path(student).expanduser()
    info = read_student_info(folder)
    if info is None or info.split is None:
        raise UserError(f"{folder} is not a split-timestep student (its sd35flash.json has no 'split'); "
                        "distil with split.steps > 0")
    if not info.split.presplit:
        raise UserError(f"{folder} did not keep its pre-split student (split.keep_presplit: false); "
                        "the distances need it")
    if (info.extra.get("config") or {}).get("mode", "full") != "full":
        raise UserError(f"{folder} is a LoRA student: its branches are adapters; the report needs mode full")
    subs = [b.subfolder for b in info.split.branches]
    pre = _load(folder, info.split.presplit)
    keys = parameter_names(folder / info.split.presplit)
    out: dict = {"student": str(folder), "merge_weights": list(info.split.merge_weights),
                 "ema": relative_distances(pre, [_load(folder, s) for s in subs], keys)}
    work = Path(info.extra.get("work_dir", ""))
    if raw_out is not None and not use_checkpoint:
        raise UserError("--raw-out reads the raw branches from the run's checkpoint; drop --no-checkpoint")
    if raw_out is not None and not (work / "checkpoints").is_dir():
        raise UserError(f"--raw-out needs the run's checkpoints, and {work / 'checkpoints'} is gone; rerun the "
                        "distillation (or pass the student whose work folder is still there)")
    if use_checkpoint and (work / "checkpoints").is_dir():
        branches, step, method = raw_branches(work)
        out["raw"] = relative_distances(pre, [{k: v.detach().cpu() for k, v in b.state_dict().items()}
                                              for b in branches], keys)
        out["raw_step"] = step
        if raw_out is not None:
            target = check_model_output(Path(raw_out).expanduser().resolve())
            plain = [b.to("cpu", torch.float32) for b in branches]
            extras = {s: b for s, b in zip(subs, plain)}
            presplit = type(plain[0]).from_pretrained(str(folder), subfolder=info.split.presplit)
            extras[info.split.presplit] = presplit
            raw_info = dataclasses.replace(info, extra={**info.extra, "raw_branches": {"from": str(folder),
                                                                                        "checkpoint_step": step}})
            method.m.unpark_encoders()  # a run with precomputed conditioning parked them
            export_student(method.m.pipe, merged_transformer(plain, info.split.merge_weights), target, raw_info,
                           extra_transformers=extras)
            out["raw_student"] = str(target)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sd35flash.distill.branch_report",
                                 description="weight distances of a split-timestep student's branches (EMA and "
                                             "raw), and a copy of the student with the raw branches")
    ap.add_argument("student", help="a student folder made with split.steps > 0")
    ap.add_argument("--json", dest="json_out", help="write the distances here")
    ap.add_argument("--raw-out", help="write the student with its raw branches (and their merge) to this folder")
    ap.add_argument("--no-checkpoint", action="store_true", help="EMA distances only: do not load the checkpoint")
    args = ap.parse_args(argv)
    try:
        res = report(args.student, args.raw_out, use_checkpoint=not args.no_checkpoint)
        if args.json_out:
            atomic_write_json(args.json_out, res)
    except UserError as e:
        print(f"branch_report: {e}", file=sys.stderr)
        return 2
    for kind in ("ema", "raw"):
        if kind in res:
            print(f"{kind:>4}: " + ", ".join(f"{k} {v:.4f}" for k, v in res[kind].items()))
    if "raw_student" in res:
        print(f"raw student (checkpoint step {res['raw_step']}): {res['raw_student']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
