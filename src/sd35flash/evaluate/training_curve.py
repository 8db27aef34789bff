"""The training curve of a teacher: the judged val probe per category, and the loss, against step.

``python -m sd35flash.evaluate.training_curve SOURCE OUT.png [--json OUT.json]``. SOURCE is a
``metrics.jsonl`` (``train/logger.py``: ``flow/loss`` every 25 steps, ``probe/<category>`` and
``probe/overall`` every ``probe_every`` steps), a pretraining work folder (``work/flow/metrics.jsonl``)
or a pipeline folder that carries ``training/flow-metrics.jsonl`` (snapshots and shipped models).
A resumed run appends to the file and may log a step twice: the last value of a step wins.
A folder whose ``training/`` holds the logs of the stages it continued (``training/init/``,
``training/init/init/``, ...: ``sd35flash pretrain --snapshot`` of a run with ``init``) gives one curve
over the whole chain: each stage's steps continue from the last step of the one before, and dashed
lines mark where a stage began.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..errors import UserError
from ..io import atomic_write, atomic_write_text
from ..train.logger import read_metrics

CANDIDATES = ("flow/metrics.jsonl", "training/flow-metrics.jsonl", "metrics.jsonl")


def find_metrics(source: str | Path) -> Path:
    p = Path(source)
    if p.is_file():
        return p
    for rel in CANDIDATES:
        if (p / rel).is_file():
            return p / rel
    raise UserError(f"{p} holds no training metrics ({', '.join(CANDIDATES)}); pass a metrics.jsonl, a "
                    "pretraining work folder or a snapshot / shipped model folder")


def stage_files(source: str | Path) -> list[Path]:
    """The flow metrics of ``source`` and, for a folder with ``training/``, of the stages it continued
    (``training/init/flow-metrics.jsonl`` and deeper), oldest first."""
    main = find_metrics(source)
    files = [main]
    if main.name == "flow-metrics.jsonl":
        d = main.parent / "init"
        while (d / "flow-metrics.jsonl").is_file():
            files.insert(0, d / "flow-metrics.jsonl")
            d = d / "init"
    return files


def chained_rows(files: list[Path]) -> tuple[list[dict], list[int]]:
    """The rows of ``files`` (stages, oldest first) on one step axis: each stage's steps are shifted by
    the last step of the stages before it. Returns the rows and the first step of every later stage."""
    rows: list[dict] = []
    starts: list[int] = []
    offset = 0
    for i, f in enumerate(files):
        if i:
            starts.append(offset)
        rows.extend({**r, "step": int(r["step"]) + offset} for r in read_metrics(f) if "step" in r)
        offset = max((r["step"] for r in rows), default=offset)
    return rows, starts


def curves(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` for ``flow/loss`` and every ``probe/*`` key, one value per step."""
    by_key: dict[str, dict[int, float]] = {}
    for r in rows:
        for k, v in r.items():
            if k == "flow/loss" or (k.startswith("probe/") and k != "probe/pixel_std"):
                by_key.setdefault(k, {})[int(r["step"])] = float(v)
    return {k: sorted(v.items()) for k, v in sorted(by_key.items())}


def plot(series: dict[str, list[tuple[int, float]]], out: Path, title: str, stage_starts: list[int] = ()) -> Path:
    fig, (ax_p, ax_l) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, x in enumerate(stage_starts):
        for ax in (ax_p, ax_l):
            ax.axvline(x, color="grey", ls="--", lw=0.8)
        ax_p.text(x, 0.97, f" stage {i + 2}", fontsize=7, color="grey", va="top")
    for k, pts in series.items():
        if k.startswith("probe/"):
            ax_p.plot(*zip(*pts), "o-" if k == "probe/overall" else "-", ms=3,
                      lw=2.2 if k == "probe/overall" else 1, label=k.split("/", 1)[1])
    ax_p.set_ylim(0, 1)
    ax_p.set_xlabel("flow step")
    ax_p.set_ylabel("judged pass rate (val probe)")
    ax_p.legend(fontsize=7, loc="upper left")
    ax_p.grid(alpha=0.3)
    loss = series.get("flow/loss", [])
    if loss:
        steps, vals = zip(*loss)
        k = max(1, len(vals) // 50)  # moving average over ~2% of the run
        smooth = [sum(vals[max(0, i - k + 1): i + 1]) / len(vals[max(0, i - k + 1): i + 1]) for i in range(len(vals))]
        ax_l.plot(steps, vals, lw=0.5, alpha=0.4, color="tab:blue")
        ax_l.plot(steps, smooth, lw=1.5, color="tab:blue", label=f"flow loss (moving mean of {k})")
        ax_l.set_yscale("log")
        ax_l.legend(fontsize=7)
    ax_l.set_xlabel("flow step")
    ax_l.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), "curve plot")
    finally:
        plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd35flash.evaluate.training_curve", description=__doc__.splitlines()[0])
    p.add_argument("source", help="metrics.jsonl, a pretraining work folder or a snapshot / shipped model folder")
    p.add_argument("out", help="output PNG")
    p.add_argument("--json", dest="json_out", help="also write the curves as JSON")
    args = p.parse_args(argv)
    try:
        files = stage_files(args.source)
        path = files[-1]
        rows, starts = chained_rows(files)
        series = curves(rows)
        if not any(k.startswith("probe/") for k in series):
            raise UserError(f"{path} holds no probe/* scalars yet (the probe runs every probe_every steps)")
        plot(series, Path(args.out), str(path), starts)
        if args.json_out:
            atomic_write_text(args.json_out, json.dumps({"source": [str(f) for f in files], "stage_starts": starts,
                                                         "curves": series}, indent=1))
    except UserError as e:
        print(f"training_curve: error: {e}", file=sys.stderr)
        return 2
    last = series["probe/overall"][-1] if "probe/overall" in series else None
    print(f"wrote {args.out}" + (f" (last probe: step {last[0]}, overall {last[1]:.3f})" if last else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
