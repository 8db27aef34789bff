"""A seeded ablation table: every row trained with several seeds, each component's effect with its
confidence interval.

Input: one folder of ``sd35flash eval`` JSONs named ``<row>.s<seed>.<split>.json`` (``row`` a name
such as ``full`` or ``nogan``, ``seed`` the training seed, ``split`` test or heldout); every row is
evaluated on the same specs and image seeds. For each row, split and metric the table gives the mean
and the sample standard deviation over training seeds. The effect of a component is the row's mean
minus the reference row's (``full``): removing a component that helps gives a negative effect.

The effect's 95% confidence interval is Welch's t interval over the per-seed scores,

    d = mean(a) - mean(b),   se = sqrt(s_a^2 / n_a + s_b^2 / n_b),
    nu = se^4 / ((s_a^2 / n_a)^2 / (n_a - 1) + (s_b^2 / n_b)^2 / (n_b - 1)),
    CI = d -+ t_{0.975, nu} * se,

so it holds both sources of noise: the training seed, and the finite image sample (each seed's
score is itself measured on a sample of images; with the same images for every row, part of that
noise cancels in ``d``). An effect is *significant* when its interval excludes 0. With fewer than
two seeds on either side there is no interval, and the table says so.

Writes ``ablation.json``, ``ablation.md`` and ``ablation.png`` (each row's per-seed scores and mean with
its interval, per split).

Usage: python -m sd35flash.evaluate.ablation DIR [--reference full] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write, atomic_write_json, atomic_write_text

NAME = re.compile(r"^(?P<row>[A-Za-z0-9_+-]+)\.s(?P<seed>\d+)\.(?P<split>[a-z]+)\.json$")
SPLIT_ORDER = {"test": 0, "heldout": 1, "val": 2}
METRICS = ("overall", "single_object", "two_objects", "counting", "colors", "position", "relation")


def collect(folder: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """``{row: {split: {seed: eval result}}}`` from the ``<row>.s<seed>.<split>.json`` files of ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of evaluation JSONs")
    runs: dict[str, dict[str, dict[int, dict]]] = {}
    for f in sorted(folder.iterdir()):
        m = NAME.match(f.name)
        if not m:
            continue
        try:
            res = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{f} is not a readable evaluation JSON ({exc}); delete it and rerun that evaluation") \
                from None
        if not isinstance(res, dict) or not isinstance(res.get("alignment"), dict):
            raise UserError(f"{f} has no 'alignment' section; it is not an `sd35flash eval` JSON")
        runs.setdefault(m["row"], {}).setdefault(m["split"], {})[int(m["seed"])] = res
    if not runs:
        raise UserError(f"{folder} holds no <row>.s<seed>.<split>.json evaluation files")
    return runs


def score(res: dict, metric: str) -> float | None:
    if metric == "fd_effnet":
        v = res.get("fd_effnet")
    else:
        v = res["alignment"].get(metric)
    return None if v is None else float(v)


def mean_std(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for a single value)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> dict:
    """``mean(a) - mean(b)`` with Welch's t interval (module docstring); ``low``/``high`` are ``None``
    when either side has fewer than two values. Equal, zero-variance sides give a zero-width interval."""
    from scipy import stats

    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    d = ma - mb
    out = {"effect": d, "low": None, "high": None, "se": None, "df": None, "significant": None}
    if sa is None or sb is None:
        return out
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return {**out, "low": d, "high": d, "se": 0.0, "df": None, "significant": d != 0.0}
    df = (va + vb) ** 2 / ((va * va / (len(a) - 1) if va else 0.0) + (vb * vb / (len(b) - 1) if vb else 0.0))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return {**out, "low": d - half, "high": d + half, "se": se, "df": df,
            "significant": not (d - half <= 0.0 <= d + half)}


def summarise(runs: dict, reference: str = "full", metrics: tuple[str, ...] = (*METRICS, "fd_effnet")) -> dict:
    """Per row and split: seeds, per-seed scores, mean and std of every metric, and the effect
    against ``reference`` with its interval (rows other than the reference)."""
    if reference not in runs:
        raise UserError(f"reference row {reference!r} has no evaluations; rows: {', '.join(sorted(runs))}")
    table: dict = {"reference": reference, "rows": {}}
    for row, splits in sorted(runs.items(), key=lambda kv: kv[0] != reference):
        out_row = {}
        for split, by_seed in splits.items():
            seeds = sorted(by_seed)
            entry: dict = {"seeds": seeds, "num_images": [by_seed[s].get("num_images") for s in seeds], "metrics": {}}
            ref = runs[reference].get(split, {})
            for metric in metrics:
                xs = [score(by_seed[s], metric) for s in seeds]
                if any(x is None for x in xs):
                    continue
                m, sd = mean_std(xs)
                cell: dict = {"values": xs, "mean": m, "std": sd}
                rs = [score(ref[s], metric) for s in sorted(ref)]
                if row != reference and rs and not any(r is None for r in rs):
                    cell["vs_reference"] = welch_interval(xs, rs)
                entry["metrics"][metric] = cell
            out_row[split] = entry
        table["rows"][row] = out_row
    return table


def _splits(table: dict) -> list[str]:
    return sorted({s for row in table["rows"].values() for s in row}, key=lambda s: (SPLIT_ORDER.get(s, 9), s))


def _fmt(cell: dict | None, digits: int = 3) -> str:
    if cell is None:
        return "-"
    s = f"{cell['mean']:.{digits}f}"
    return s + (f" ± {cell['std']:.{digits}f}" if cell["std"] is not None else " (1 seed)")


def _effect(cell: dict | None, digits: int = 3) -> str:
    if cell is None or "vs_reference" not in cell:
        return "-"
    e = cell["vs_reference"]
    if e["low"] is None:
        return f"{e['effect']:+.{digits}f} (no interval: < 2 seeds)"
    mark = "" if e["significant"] else ", n.s."
    return f"{e['effect']:+.{digits}f} [{e['low']:+.{digits}f}, {e['high']:+.{digits}f}{mark}]"


def markdown(table: dict, metrics: tuple[str, ...] = ("overall", "two_objects", "relation", "fd_effnet")) -> str:
    """One table per split: mean ± std over seeds, and the effect on overall against the reference."""
    lines = []
    splits = _splits(table)
    for split in splits:
        lines += [f"**{split}** (mean ± std over training seeds; effect = row - {table['reference']}, "
                  "95% Welch interval, n.s. = not significant)", "",
                  "| row | seeds | images | " + " | ".join(metrics) + " | effect on overall |",
                  "|---|---|---|" + "---|" * len(metrics) + "---|"]
        for row, splits_of in table["rows"].items():
            e = splits_of.get(split)
            if e is None:
                continue
            m = e["metrics"]
            cells = [_fmt(m.get(k), 1 if k == "fd_effnet" else 3) for k in metrics]
            n = sorted({x for x in e["num_images"] if x is not None})
            lines.append(f"| {row} | {len(e['seeds'])} | {'/'.join(map(str, n))} | " + " | ".join(cells)
                         + f" | {_effect(m.get('overall'))} |")
        lines.append("")
    return "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    """Overall alignment per row: each seed as a dot, the mean with its 95% t interval, per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    splits = _splits(table)
    rows = list(table["rows"])
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 0.5 * len(rows) + 1.6), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for y, row in enumerate(rows):
            cell = table["rows"][row].get(split, {}).get("metrics", {}).get("overall")
            if cell is None:
                continue
            xs = cell["values"]
            ax.plot(xs, [y] * len(xs), "o", color="tab:blue", alpha=0.5, ms=4)
            if cell["std"] is not None:
                half = float(stats.t.ppf(0.975, len(xs) - 1)) * cell["std"] / math.sqrt(len(xs))
                ax.errorbar([cell["mean"]], [y], xerr=[[half], [half]], fmt="D", color="black", ms=5, capsize=3)
            else:
                ax.plot([cell["mean"]], [y], "D", color="black", ms=5)
        ref = table["rows"].get(table["reference"], {}).get(split, {}).get("metrics", {}).get("overall")
        if ref is not None:
            ax.axvline(ref["mean"], color="gray", ls="--", lw=1)
        ax.set_yticks(range(len(rows)), rows)
        ax.invert_yaxis()
        ax.set_xlabel("overall alignment")
        ax.set_title(f"{split}: seeds (dots), mean and 95% CI")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), "ablation plot")
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd35flash.evaluate.ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="folder of <row>.s<seed>.<split>.json evaluation files")
    p.add_argument("--reference", default="full", help="the row every effect is measured against")
    p.add_argument("--out", type=Path, help="where ablation.{json,md,png} go (default: DIR)")
    args = p.parse_args(argv)
    try:
        table = summarise(collect(args.dir), args.reference)
        out = args.out or args.dir
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "ablation.json", table, "ablation table")
        text = markdown(table)
        atomic_write_text(out / "ablation.md", text)
        plot(table, out / "ablation.png")
    except UserError as e:
        print(f"sd35flash.evaluate.ablation: error: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"wrote {out / 'ablation.json'}, ablation.md and ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
