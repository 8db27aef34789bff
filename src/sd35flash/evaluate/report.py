"""The HTML report: metrics table, per-category bars, image grids, a side-by-side comparison of the
same prompts and seeds across models, loss curves, alignment vs NFE, extra figures, stage timings."""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
from pathlib import Path

import matplotlib
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker

from ..io import atomic_write_text
from ..train.logger import read_metrics
from ..world import CATEGORIES


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def category_bars(results: dict[str, dict], path: Path) -> str:
    cats = [*CATEGORIES, "overall"]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / max(1, len(results))
    for j, (name, r) in enumerate(results.items()):
        vals = [r["alignment"].get(c, 0.0) for c in cats]
        ax.bar([i + j * width for i in range(len(cats))], vals, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel("alignment (judge)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _log_ticks_at(ax, values: list[float]) -> None:
    """Label a log axis only at the plotted values (matplotlib's minor labels on an axis spanning
    about a decade overlap each other)."""
    ticks = sorted({float(v) for v in values if v and v > 0})
    if ticks:
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def alignment_vs_nfe(results: dict[str, dict], path: Path) -> str:
    """One point per model, named in a legend (labels next to the points overlap: the 4-step
    variants share one NFE and nearly one score); teachers as squares, students as circles."""
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for name, r in results.items():
        ax.scatter(r["nfe_per_image"], r["alignment"]["overall"], s=40, label=name,
                   marker="s" if name.startswith("teacher") else "o")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    ax.set_xscale("log")
    _log_ticks_at(ax, [r["nfe_per_image"] for r in results.values()])
    ax.set_xlabel("NFE per image (log)")
    ax.set_ylabel("alignment.overall")
    ax.set_ylim(0, 1)
    return _save(fig, path)


def loss_curves(metric_files: dict[str, Path], path: Path) -> str | None:
    series = {name: read_metrics(p) for name, p in metric_files.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], series.items()):
        keys = sorted({k for r in rows for k in r if k.endswith("loss")})
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            ax.plot(*zip(*pts), label=k, lw=1)
        pkey = "probe/overall" if any("probe/overall" in r for r in rows) else "probe/alignment"
        probe = [(r["step"], r[pkey]) for r in rows if pkey in r]
        if probe:
            ax2 = ax.twinx()
            ax2.plot(*zip(*probe), "o-", color="tab:green", label="probe alignment", ms=3)
            ax2.set_ylim(0, 1)
            ax2.set_ylabel("probe alignment", color="tab:green")
        neg = any(r[k] <= 0 for r in rows for k in keys if k in r)
        if neg:  # the hinge generator loss goes negative
            ax.set_yscale("symlog", linthresh=1e-3)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def _data_uri(path: Path) -> str:
    im = Image.open(path).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def comparison_table(results: dict[str, dict], n: int = 8) -> str:
    """HTML table: one row per model, one column per prompt, the first ``n`` images of each model's
    ``images_dir`` (``eval --save-images``); only models whose first ``n`` (prompt, seed) pairs match
    the first model's are shown. Green border: the judge accepts the image; red: it does not."""
    rows, header = [], None
    for name, r in results.items():
        d = Path(r["images_dir"]) if r.get("images_dir") else None
        if d is None or not (d / "manifest.jsonl").is_file():
            continue
        lines = [json.loads(x) for x in (d / "manifest.jsonl").read_text().splitlines()[:n] if x.strip()]
        key = [(x["prompt"], x["seed"]) for x in lines]
        if header is None:
            header = key
        elif key != header:
            continue
        cells = "".join(f"<td><img class='cmp {'ok' if x['correct'] else 'bad'}' src='{_data_uri(d / x['file'])}' "
                        f"alt='{html.escape(name)}: {html.escape(x['prompt'])}'></td>" for x in lines)
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    if header is None:
        return ""
    head = "".join(f"<th class='prompt'>{html.escape(p)}<br>seed {sd}</th>" for p, sd in header)
    return f"<table class='cmp'><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"


def write_report(out_dir: Path, title: str, results: dict[str, dict], metric_files: dict[str, Path],
                 notes: list[str] | None = None, figures: dict[str, Path] | None = None,
                 timings: dict[str, float] | None = None) -> Path:
    """Write ``out_dir/report.html`` (with its PNGs beside it) from evaluation results keyed by model
    name. ``figures``: extra PNGs by title (copied beside the report); ``timings``: seconds per stage."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bars = category_bars(results, out_dir / "categories.png")
    nfe = alignment_vs_nfe(results, out_dir / "alignment_vs_nfe.png")
    curves = loss_curves(metric_files, out_dir / "loss_curves.png")
    extra = []
    for i, (cap, src) in enumerate((figures or {}).items()):
        if Path(src).is_file():
            dest = out_dir / f"figure-{i}{Path(src).suffix}"
            if Path(src).resolve() != dest.resolve():
                shutil.copyfile(src, dest)
            extra.append(f"<h2>{html.escape(cap)}</h2><img src='{dest.name}' alt='{html.escape(cap)}'>")
    timing = ""
    if timings:
        trs = "".join(f"<tr><td style='text-align:left'>{html.escape(k)}</td><td>{v:.0f}</td></tr>"
                      for k, v in timings.items())
        timing = f"<h2>Wall time per stage (s)</h2><table>{trs}</table>"
    compare = comparison_table(results)
    if compare:
        compare = ("<h2>Side by side: the same prompts and seeds for every model</h2>"
                   f"<p>green: the judge accepts the image; red: it does not.</p>{compare}")
    cols = ["model", "split", "steps", "guidance", "NFE", "overall", *CATEGORIES, "colors", "fd_effnet", "s/image",
            "transformer MB"]
    rows = []
    for name, r in results.items():
        a = r["alignment"]
        fd = r.get("fd_effnet")
        cells = [name, r.get("split") or "specs", r["steps"], r["guidance"], r["nfe_per_image"],
                 f"{a['overall']:.3f}", *[f"{a.get(c, float('nan')):.3f}" for c in CATEGORIES],
                 f"{a.get('colors', float('nan')):.3f}", "-" if fd is None else f"{fd:.2f}",
                 f"{r['seconds_per_image']:.3f}",
                 f"{r['transformer_bytes'] / 2**20:.1f}" if r.get("transformer_bytes") else "-"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    grids = []
    for name, r in results.items():
        src = Path(r["grid"])
        if src.is_file():
            dest = out_dir / f"grid-{name}.png"
            if src.resolve() != dest.resolve():
                shutil.copyfile(src, dest)
            grids.append(f"<h3>{html.escape(name)}</h3><img src='{dest.name}' alt='{html.escape(name)} samples'>")
    body = f"""<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1400px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 7px;font-size:13px;text-align:right}}img{{max-width:100%}}
th.prompt{{font-size:11px;font-weight:normal;max-width:140px;text-align:center}}img.cmp{{border:3px solid}}
img.cmp{{width:128px;image-rendering:pixelated}}img.ok{{border-color:#2a2}}img.bad{{border-color:#d33}}</style></head>
<body><h1>{html.escape(title)}</h1>
{''.join(f'<p>{html.escape(n)}</p>' for n in (notes or []))}
<h2>Metrics</h2><table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{''.join(rows)}</table>
<p>alignment: fraction of images the shapes-world judge accepts (GenEval-style); overall = mean over categories.
fd_effnet: Frechet distance of EfficientNet-Lite0 features to renders of the same specs (lower is better).</p>
<h2>Alignment per category</h2><img src='{bars}' alt='per-category alignment'>
<h2>Alignment against compute</h2><img src='{nfe}' alt='alignment vs NFE'>
{f"<h2>Training curves</h2><img src='{curves}' alt='loss curves'>" if curves else ''}
{''.join(extra)}
{compare}
<h2>Samples per model (X = judged wrong)</h2>{''.join(grids)}
{timing}
<h2>Raw results</h2><pre>{html.escape(json.dumps(results, indent=1))}</pre>
</body></html>"""
    return atomic_write_text(out_dir / "report.html", body)
