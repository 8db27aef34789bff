"""Plot ``gan/d_real`` and ``gan/d_fake`` against the step for distill runs, one panel per run, and print
the last-half means of ``d_real - d_fake`` and the D loss (docs/RESULTS.md, "Why the discriminator did
not learn").

usage: python bench/gan_curves.py OUT.png NAME=WORK_FOLDER [NAME=WORK_FOLDER ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(png: str, runs: list[str]) -> None:
    cols = min(4, len(runs))
    rows_n = -(-len(runs) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.0 * cols, 3.0 * rows_n), sharey=True, squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    for ax, run in zip(axes.flat, runs):
        name, work = run.split("=", 1)
        rows = [json.loads(line) for line in (Path(work) / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "gan/d_real" in r]
        half = rows[len(rows) // 2:]

        def mean(key: str, rs=half) -> float:
            return sum(r[key] for r in rs) / len(rs)

        gap = sum(r["gan/d_real"] - r["gan/d_fake"] for r in half) / len(half)
        print(f"{name}: {len(rows)} critic steps; last half: d_real {mean('gan/d_real'):+.3f}, "
              f"d_fake {mean('gan/d_fake'):+.3f}, d_real - d_fake {gap:+.4f}, D loss {mean('gan/d_loss'):.3f}, "
              f"fake loss {mean('fake/loss'):.3f}, steps with d_real > d_fake "
              f"{sum(r['gan/d_real'] > r['gan/d_fake'] for r in half)}/{len(half)}")
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["gan/d_real"] for r in rows], label="d_real")
        ax.plot(steps, [r["gan/d_fake"] for r in rows], label="d_fake")
        ax.set_title(f"{name}\ngap {gap:+.3f}, D loss {mean('gan/d_loss'):.2f}", fontsize=9)
        ax.set_xlabel("step")
    for row in axes:
        row[0].set_ylabel("mean logit")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
