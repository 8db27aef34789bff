"""``sd35flash study results``: ratings, intervals, agreement and the compute plot of one study.

Steps:

1. read every vote with its pair; drop the annotators whose gold-pair failure rate is above
   ``max_gold_failure`` (annotators who saw no gold pair are kept);
2. fit Bradley-Terry on the model-pair votes (repeats are left out: they measure self-consistency),
   report it on the ELO scale with 95% bootstrap intervals resampled over prompts;
3. win-rate matrix, per-category scores (shapes world), Krippendorff's alpha across annotators on
   shared pairs, self-consistency on repeats;
4. the votes still needed to separate each pair of models adjacent in the ranking;
5. a plot of score against NFE and against seconds per image; JSON and a self-contained HTML page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..io import atomic_write_text
from . import db, ratings
from .folder import StudyFolder

WINNER_CODE = {"a": 0.0, "tie": 1.0, "b": 2.0}


def _load_votes(folder: StudyFolder) -> list[dict[str, Any]]:
    if not folder.database.is_file():
        return []
    try:
        con = db.connect(folder.database)
        try:
            return db.all_votes(con)
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise UserError(f"cannot read the votes in {folder.database} ({exc})") from None


def gold_report(votes: list[dict], max_failure: float) -> tuple[dict[str, dict], set[str]]:
    """Per annotator: gold pairs seen, failed and the failure rate; plus the set excluded by ``max_failure``."""
    per: dict[str, dict] = defaultdict(lambda: {"gold": 0, "failed": 0})
    for v in votes:
        per[v["annotator"]]  # every annotator appears
        if v["kind"] == "gold":
            per[v["annotator"]]["gold"] += 1
            per[v["annotator"]]["failed"] += int(v["winner"] != v["correct"])
    out, excluded = {}, set()
    for ann, r in per.items():
        rate = r["failed"] / r["gold"] if r["gold"] else None
        out[ann] = {**r, "failure_rate": rate}
        if rate is not None and rate > max_failure:
            excluded.add(ann)
    return out, excluded


def self_consistency(votes: list[dict]) -> dict[str, Any]:
    """Share of repeats an annotator answered as the first time (same winner model, or tie both times)."""
    first = {(v["annotator"], v["pair_id"]): v["winner"] for v in votes if v["kind"] == "model"}
    agree = [first[(v["annotator"], v["repeat_of"])] == v["winner"] for v in votes
             if v["kind"] == "repeat" and (v["annotator"], v["repeat_of"]) in first]
    return {"repeats": len(agree), "agreement": float(np.mean(agree)) if agree else None}


def agreement(votes: list[dict]) -> dict[str, Any]:
    """Krippendorff's alpha (ordinal: a < tie < b) over model pairs that two or more annotators rated."""
    by_pair: dict[str, dict[str, float]] = defaultdict(dict)
    for v in votes:
        if v["kind"] == "model":
            by_pair[v["pair_id"]][v["annotator"]] = WINNER_CODE[v["winner"]]
    shared = {p: r for p, r in by_pair.items() if len(r) >= 2}
    coders = sorted({a for r in shared.values() for a in r})
    mat = np.full((len(coders), len(shared)), np.nan)
    index = {a: i for i, a in enumerate(coders)}
    for u, r in enumerate(shared.values()):
        for a, val in r.items():
            mat[index[a], u] = val
    return {"krippendorff_alpha": ratings.krippendorff_alpha(mat), "shared_pairs": len(shared),
            "level": "ordinal"}


def _fit(votes: list[dict], names: list[str], prompt_ids: list[str], resamples: int, seed: int) -> dict[str, Any]:
    idx = {n: i for i, n in enumerate(names)}
    pidx = {p: i for i, p in enumerate(prompt_ids)}
    w_groups = ratings.win_counts([idx[v["a"]] for v in votes], [idx[v["b"]] for v in votes],
                                  [v["winner"] for v in votes], len(names), [pidx[v["prompt_id"]] for v in votes],
                                  len(prompt_ids))
    used = w_groups[w_groups.reshape(len(prompt_ids), -1).sum(axis=1) > 0]
    w = w_groups.sum(axis=0)
    p = ratings.bradley_terry(w)
    elo = ratings.elo_scale(p)
    fit: dict[str, Any] = {"w": w, "p": p, "elo": elo}
    if resamples and len(used):
        boot = ratings.bootstrap_elo(used, resamples, seed=seed)
        fit["ci"] = ratings.percentile_ci(boot)
    return fit


def compute_results(study_dir: str | Path, resamples: int = 1000, max_gold_failure: float = 0.25,
                    seed: int = 0) -> dict[str, Any]:
    """Everything ``study results`` reports, as a JSON-ready dict."""
    folder = StudyFolder(study_dir)
    manifest = folder.manifest()
    if resamples < 1000:
        raise UserError(f"--resamples must be at least 1000 for a 95% interval, got {resamples}")
    names = list(manifest["models"])
    prompts = manifest["prompts"]
    prompt_ids = [p["id"] for p in prompts]
    category = {p["id"]: p.get("category") for p in prompts}
    all_votes = _load_votes(folder)
    gold, excluded = gold_report(all_votes, max_gold_failure)
    votes = [v for v in all_votes if v["annotator"] not in excluded]
    model_votes = [v for v in votes if v["kind"] == "model"]
    res: dict[str, Any] = {
        "study": str(folder.root), "votes": len(model_votes), "votes_total": len(all_votes),
        "annotators": len(gold), "excluded_annotators": len(excluded), "max_gold_failure": max_gold_failure,
        "resamples": resamples, "gold": {"seen": sum(g["gold"] for g in gold.values()),
                                         "failed": sum(g["failed"] for g in gold.values())},
        "self_consistency": self_consistency(votes), "agreement": agreement(votes),
    }
    fit = _fit(model_votes, names, prompt_ids, resamples, seed) if model_votes else None
    models: dict[str, Any] = {}
    for i, n in enumerate(names):
        info = manifest["models"][n]
        row = {"bt": None, "elo": None, "ci_low": None, "ci_high": None, "nfe": info.get("nfe"),
               "steps": info.get("steps"), "guidance": info.get("guidance"),
               "seconds_per_image": info.get("seconds_per_image"), "model": info.get("model")}
        if fit is not None:
            row.update(bt=float(fit["p"][i]), elo=float(fit["elo"][i]))
            if "ci" in fit:
                row.update(ci_low=float(fit["ci"][0][i]), ci_high=float(fit["ci"][1][i]))
        models[n] = row
    res["models"] = models
    ranking = sorted(names, key=lambda n: -(models[n]["elo"] if models[n]["elo"] is not None else -np.inf))
    res["ranking"] = ranking
    if fit is not None:
        rates = ratings.win_rates(fit["w"])
        res["win_rate"] = {a: {b: (None if np.isnan(rates[i, j]) else float(rates[i, j]))
                               for j, b in enumerate(names)} for i, a in enumerate(names)}
        idx = {n: i for i, n in enumerate(names)}
        sep = []
        for hi, lo in zip(ranking, ranking[1:]):
            i, j = idx[hi], idx[lo]
            met = float(fit["w"][i, j] + fit["w"][j, i])
            separated = models[hi]["ci_low"] is not None and models[hi]["ci_low"] > models[lo]["ci_high"]
            sep.append({"higher": hi, "lower": lo, "head_to_head_votes": met, "cis_separate": bool(separated),
                        "votes_needed": ratings.votes_to_separate(float(fit["p"][i]), float(fit["p"][j]), met)})
        res["adjacent"] = sep
        cats = sorted({c for c in category.values() if c})
        res["categories"] = {}
        for c in cats:
            sub = [v for v in model_votes if category[v["prompt_id"]] == c]
            if sub:
                f = _fit(sub, names, prompt_ids, 0, seed)
                res["categories"][c] = {"votes": len(sub), "elo": {n: float(f["elo"][i]) for i, n in enumerate(names)}}
    res["gold_per_annotator"] = gold
    return res


def compute_plot(res: dict[str, Any]) -> bytes | None:
    """PNG: ELO score (95% CI bars) against NFE and against seconds per image, one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [(n, m) for n, m in res["models"].items() if m["elo"] is not None]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "nfe", "NFE (network evaluations per image)"),
                           (axes[1], "seconds_per_image", "seconds per image")):
        pts = [(n, m) for n, m in rows if m.get(key)]
        span = max((m["elo"] for _, m in pts), default=0) - min((m["elo"] for _, m in pts), default=0)
        placed: list[tuple[float, float]] = []
        for n, m in pts:
            err = None
            if m["ci_low"] is not None:
                err = [[m["elo"] - m["ci_low"]], [m["ci_high"] - m["elo"]]]
            ax.errorbar([m[key]], [m["elo"]], yerr=err, fmt="o", capsize=4)
            # points that (nearly) coincide get their labels stacked instead of printed over each other
            near = sum(1 for x, y in placed if abs(x - m[key]) <= 0.1 * max(x, m[key])
                       and abs(y - m["elo"]) <= 0.06 * span + 1e-9)
            placed.append((m[key], m["elo"]))
            ax.annotate(n, (m[key], m["elo"]), textcoords="offset points", xytext=(6, 4 - 10 * near), fontsize=8)
        if pts and min(m[key] for _, m in pts) > 0:
            ax.set_xscale("log")
            # label only the plotted values, and of values closer than about a sixth of the axis's
            # decades only the first: minor labels on a log axis of about a decade overlap, and so do
            # near-equal values
            values = sorted({m[key] for _, m in pts})
            gap = max(1.5, 10 ** (math.log10(values[-1] / values[0]) / 6))
            ticks: list[float] = []
            for v in values:
                if not ticks or v >= gap * ticks[-1]:
                    ticks.append(v)
            ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:.3g}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("ELO-scale score")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _fmt(x: Any, digits: int = 0) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return html.escape(str(x))


def render_html(res: dict[str, Any], plot: bytes | None) -> str:
    """A self-contained HTML report (the plot is embedded as a data URL; every text is escaped)."""
    e = html.escape
    names = list(res["models"])
    rows = "".join(
        f"<tr><td>{e(n)}</td><td>{_fmt(m['elo'])}</td><td>{_fmt(m['ci_low'])} to {_fmt(m['ci_high'])}</td>"
        f"<td>{_fmt(m['bt'], 3)}</td><td>{_fmt(m['nfe'])}</td><td>{_fmt(m['seconds_per_image'], 4)}</td></tr>"
        for n, m in sorted(res["models"].items(), key=lambda kv: res["ranking"].index(kv[0])))
    parts = [f"<h1>Study results: {e(res['study'])}</h1>",
             f"<p>{res['votes']} model-pair votes used ({res['votes_total']} in all) "
             f"from {res['annotators']} annotators; "
             f"{res['excluded_annotators']} excluded for failing more than {res['max_gold_failure']:.0%} "
             "of gold pairs. "
             f"95% intervals from {res['resamples']} bootstrap resamples over prompts.</p>",
             "<table><tr><th>model</th><th>ELO</th><th>95% CI</th><th>BT strength</th><th>NFE</th>"
             f"<th>s / image</th></tr>{rows}</table>"]
    if plot:
        src = "data:image/png;base64," + base64.b64encode(plot).decode()
        parts.append(f'<p><img alt="score against compute" src="{src}"></p>')
    if "win_rate" in res:
        head = "".join(f"<th>{e(n)}</th>" for n in names)
        body = "".join(f"<tr><th>{e(a)}</th>" + "".join(f"<td>{_fmt(res['win_rate'][a][b], 2)}</td>" for b in names)
                       + "</tr>" for a in names)
        parts.append(f"<h2>Win rate (row beats column, ties half)</h2><table><tr><th></th>{head}</tr>{body}</table>")
        sep = "".join(f"<tr><td>{e(s['higher'])} &gt; {e(s['lower'])}</td><td>{_fmt(s['head_to_head_votes'])}</td>"
                      f"<td>{'yes' if s['cis_separate'] else 'no'}</td><td>{_fmt(s['votes_needed'])}</td></tr>"
                      for s in res["adjacent"])
        parts.append("<h2>Adjacent pairs</h2><table><tr><th>pair</th><th>head-to-head votes</th>"
                     f"<th>CIs separate</th><th>more votes needed</th></tr>{sep}</table>")
    if res.get("categories"):
        head = "".join(f"<th>{e(n)}</th>" for n in names)
        body = "".join(f"<tr><td>{e(c)}</td><td>{r['votes']}</td>"
                       + "".join(f"<td>{_fmt(r['elo'][n])}</td>" for n in names)
                       + "</tr>" for c, r in res["categories"].items())
        parts.append(f"<h2>Per category (ELO)</h2><table><tr><th>category</th><th>votes</th>{head}</tr>{body}</table>")
    ag, sc = res["agreement"], res["self_consistency"]
    parts.append(f"<h2>Annotators</h2><p>Krippendorff's alpha ({ag['level']}): {_fmt(ag['krippendorff_alpha'], 3)} "
                 f"on {ag['shared_pairs']} shared pairs. Self-consistency on {sc['repeats']} repeats: "
                 f"{_fmt(sc['agreement'], 3)}. "
                 f"Gold pairs failed: {res['gold']['failed']} of {res['gold']['seen']}.</p>")
    style = ("body{font:15px system-ui,sans-serif;max-width:960px;margin:24px auto;padding:0 12px}"
             "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>study results</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")


def write_results(study_dir: str | Path, json_out: str | Path | None, html_out: str | Path | None,
                  resamples: int = 1000, max_gold_failure: float = 0.25, seed: int = 0) -> dict[str, Any]:
    res = compute_results(study_dir, resamples=resamples, max_gold_failure=max_gold_failure, seed=seed)
    if json_out:
        atomic_write_text(json_out, json.dumps(res, indent=1))
    if html_out:
        atomic_write_text(html_out, render_html(res, compute_plot(res)))
    return res
