"""``sd35flash merge-sweep``: choose the split-timestep merge ratio on ``val``.

For each ratio ``r`` the student's two branches are merged, ``W = (1 - r) W_0 + r W_1``
(:mod:`sd35flash.models.merge`), and the merged transformer is evaluated (alignment and FD) on the
``val`` split; ``test`` and ``heldout`` are refused, since the ratio is a model-selection choice.

Choice (an FD guard, then alignment): a ratio is admissible when its ``fd_effnet`` is at most
``(1 + fd_tolerance)`` times the lowest FD of the sweep; among admissible ratios the highest
``alignment.overall`` wins, ties going to the lower FD, then the lower ratio. Writes ``sweep.json``
(the curve and the choice), ``sweep.png`` (alignment and FD against the ratio) and the chosen merged
student folder.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tqdm.auto import tqdm

from ..errors import UserError
from ..io import atomic_write_json, check_model_output, check_writable_output
from ..models.merge import load_branches, merge_state_dicts, ratio_weights, write_merged
from ..models.pipeline_io import load_pipeline
from ..models.student_info import read_student_info
from .evaluator import EvalRequest, evaluate

SELECTION_SPLIT = "val"
#: At most this many ratios per sweep (each one is a full evaluation).
MAX_RATIOS = 101


def parse_ratios(text: str) -> list[float]:
    """``start:stop:step`` (inclusive, e.g. ``0:1:0.1`` -> 0, 0.1, ..., 1) or a comma list ``0,0.3,1``;
    UserError for anything malformed or outside [0, 1]."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            if not all(math.isfinite(x) for x in (start, stop, step)):
                raise ValueError
            n = math.floor(min((stop - start) / step, 1e9) + 1e-9) + 1
            if n > MAX_RATIOS:
                raise UserError(f"--ratios {text!r} gives {n} ratios; at most {MAX_RATIOS} (each is a full "
                                "evaluation): use a larger step")
            vals = [round(start + i * step, 10) for i in range(n)]
        else:
            vals = [float(x) for x in text.split(",") if x.strip()]
    except (ValueError, OverflowError):
        raise UserError(f"--ratios {text!r} is malformed; use start:stop:step (0:1:0.1) or a list (0,0.3,1)") from None
    if not vals:
        raise UserError(f"--ratios {text!r} holds no ratio")
    if len(vals) > MAX_RATIOS:
        raise UserError(f"--ratios holds {len(vals)} ratios; at most {MAX_RATIOS} (each is a full evaluation)")
    if not all(math.isfinite(r) for r in vals):
        raise UserError(f"--ratios {text!r} holds a non-finite number; ratios lie in [0, 1]")
    for r in vals:
        ratio_weights(r)  # UserError outside [0, 1]
    return sorted(set(vals))


@dataclass
class SweepRequest:
    student: str
    out: str
    ratios: list[float]
    split: str = SELECTION_SPLIT
    num_images: int = 100
    seed: int = 0
    batch_size: int = 32
    fd_tolerance: float = 0.1
    fd: bool = True


def choose(points: list[dict], fd_tolerance: float) -> dict:
    """The FD-guarded, alignment-maximising point (see the module docstring)."""
    fds = [p["fd_effnet"] for p in points if p.get("fd_effnet") is not None]
    limit = (1.0 + fd_tolerance) * min(fds) if fds else math.inf
    ok = [p for p in points if p.get("fd_effnet") is None or p["fd_effnet"] <= limit + 1e-12]
    return min(ok, key=lambda p: (-p["alignment"]["overall"], p.get("fd_effnet") or 0.0, p["ratio"]))


def plot(points: list[dict], chosen: dict, path: Path, num_images: int | None = None) -> Path:
    """Alignment (with +-1 binomial SE bars over ``num_images`` when given) and FD against the ratio."""
    rs = [p["ratio"] for p in points]
    ys = [p["alignment"]["overall"] for p in points]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    se = [math.sqrt(max(y * (1 - y), 0.0) / num_images) for y in ys] if num_images else None
    ax.errorbar(rs, ys, yerr=se, fmt="o-", color="tab:blue", capsize=3,
                label="alignment.overall" + (" (+-1 SE)" if se else ""))
    ax.axvline(chosen["ratio"], color="gray", ls="--", lw=1)
    ax.set_xlabel("merge ratio r  (W = (1 - r) W_0 + r W_1)")
    ax.set_ylabel("alignment.overall (val)", color="tab:blue")
    if all(p.get("fd_effnet") is not None for p in points):
        ax2 = ax.twinx()
        ax2.plot(rs, [p["fd_effnet"] for p in points], "s--", color="tab:red", label="fd_effnet", ms=4)
        ax2.set_ylabel("fd_effnet (val)", color="tab:red")
    ax.set_title(f"merge-ratio sweep (chosen r = {chosen['ratio']:g}"
                 + (f", {num_images} images, bars +-1 SE)" if se else ")"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_request(req: SweepRequest) -> None:
    """Every input of a sweep, checked before any evaluation (one-line UserErrors)."""
    if not math.isfinite(req.fd_tolerance) or not 0.0 <= req.fd_tolerance <= 100.0:
        raise UserError(f"--fd-tolerance must be a number in [0, 100], got {req.fd_tolerance}")
    if not req.ratios or len(req.ratios) > MAX_RATIOS:
        raise UserError(f"a sweep needs 1 to {MAX_RATIOS} ratios, got {len(req.ratios)}")
    student = Path(req.student).expanduser()
    if not student.exists():
        raise UserError(f"--student {student} does not exist; pass a split-timestep student folder")
    if not student.is_dir():
        raise UserError(f"--student {student} is a file; pass a split-timestep student folder")
    check_writable_output(req.out, "dir", "--out")
    check_model_output(Path(req.out) / "student", "--out student folder")


def merge_sweep(req: SweepRequest, progress: bool = True) -> dict:
    """Evaluate every ratio on ``val``, choose one, write the curve, the plot and the chosen student."""
    if req.split != SELECTION_SPLIT:
        raise UserError(f"merge-sweep selects the ratio on the '{SELECTION_SPLIT}' split only; --split {req.split} "
                        "would choose the model on the data it is reported on")
    check_request(req)
    info = read_student_info(req.student)
    if info is None or info.split is None:
        raise UserError(f"{req.student} has no split-timestep branches to merge (distil with split.steps > 0)")
    if len(info.split.branches) != 2:
        raise UserError(f"merge-sweep sweeps one ratio between 2 branches; {req.student} has "
                        f"{len(info.split.branches)} (use `sd35flash merge --weights`)")
    out = Path(req.out)
    pipe = load_pipeline(req.student)
    out.mkdir(parents=True, exist_ok=True)
    states = [b.state_dict() for b in load_branches(req.student, pipe.transformer)]
    points = []
    for r in tqdm(req.ratios, desc="merge-sweep", disable=not progress):
        pipe.transformer.load_state_dict(merge_state_dicts(states, ratio_weights(r)))
        er = EvalRequest(model=req.student, split=req.split, num_images=req.num_images, seed=req.seed,
                         batch_size=req.batch_size, fd=req.fd, variant="merged")
        res = evaluate(er, out / f"eval-r{r:.3f}.json", pipe=pipe, progress=progress)
        points.append({"ratio": r, "alignment": res["alignment"], "fd_effnet": res.get("fd_effnet"),
                       "eval": str(out / f"eval-r{r:.3f}.json")})
    best = choose(points, req.fd_tolerance)
    chosen_dir = write_merged(req.student, out / "student", ratio_weights(best["ratio"]),
                              note={"source": str(req.student), "ratio": best["ratio"], "selected_on": req.split,
                                    "sweep": str(out / "sweep.json")})
    plot(points, best, out / "sweep.png", req.num_images)
    result = {"student": str(req.student), "request": asdict(req), "rule": f"max alignment.overall among ratios "
              f"with fd_effnet <= (1 + {req.fd_tolerance}) x min fd_effnet; ties: lower FD, then lower ratio",
              "points": points, "chosen_ratio": best["ratio"], "chosen_student": str(chosen_dir),
              "plot": str(out / "sweep.png")}
    atomic_write_json(out / "sweep.json", result, "sweep JSON")
    return result
