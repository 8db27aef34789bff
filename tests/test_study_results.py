"""`study results` and `study oracle` end to end on the smoke study, votes with known strengths
through the vote store, gold-failure filtering, and the study CLI's one-line errors."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from sd35flash.cli import main
from sd35flash.study import db
from sd35flash.study.app import create_app
from sd35flash.study.results import compute_results

STRENGTH = {"fast2": 1.0, "mid4": 2.0, "slow8": 4.0}


@pytest.fixture()
def study(smoke_study, tmp_path):
    dst = tmp_path / "study"
    shutil.copytree(smoke_study, dst)
    return dst


def _simulate(study, annotators: int, seed: int, gold_liar: bool = False, certain: bool = False) -> None:
    """Annotators who prefer each model in proportion to STRENGTH (Bradley-Terry; ``certain``: always the
    stronger one) and get gold right; with ``gold_liar`` one more annotator who always answers gold pairs
    wrong and models at random."""
    create_app(study)  # makes the database
    con = db.connect(study / "votes.sqlite3")
    rng = random.Random(seed)
    proto = db.Protocol(votes_per_annotator=20, gold_share=0.1, repeat_share=0.1)
    for k in range(annotators + int(gold_liar)):
        liar = gold_liar and k == annotators
        ann = db.create_annotator(con, proto, rng)
        while True:
            row, _, _ = db.next_pair(con, ann)
            if row is None:
                break
            left, right = ("b", "a") if row["swap"] else ("a", "b")
            if row["kind"] == "gold":
                good = row["correct"]
                pick = ({"a", "b"} - {good}).pop() if liar else good
            elif liar:
                pick = rng.choice("ab")
            else:
                sa, sb = STRENGTH[row["a"]], STRENGTH[row["b"]]
                pick = "a" if (sa > sb if certain else rng.random() < sa / (sa + sb)) else "b"
            db.record_vote(con, ann, row["pair_id"], "left" if pick == left else "right")
    con.close()


def test_known_strengths_through_the_vote_store(study):
    _simulate(study, annotators=60, seed=0, gold_liar=True)
    res = compute_results(study, resamples=1000)
    assert res["ranking"] == ["slow8", "mid4", "fast2"]
    assert res["excluded_annotators"] == 1 and res["annotators"] == 61
    m = res["models"]
    for name in STRENGTH:
        assert m[name]["ci_low"] < m[name]["elo"] < m[name]["ci_high"]
    true_gap = 400 * np.log10(2)  # each step of STRENGTH doubles the odds
    for hi, lo in (("slow8", "mid4"), ("mid4", "fast2")):
        gap = m[hi]["elo"] - m[lo]["elo"]
        assert abs(gap - true_gap) < 0.6 * true_gap
    assert res["votes"] == 60 * 16  # model pairs only: gold, repeats and the excluded annotator are left out
    wr = res["win_rate"]
    assert 0.6 < wr["slow8"]["fast2"] < 0.95 and wr["fast2"]["slow8"] == pytest.approx(1 - wr["slow8"]["fast2"])
    assert set(res["categories"]) <= {"single_object", "position", "two_objects", "relation", "counting"}
    assert res["categories"] and all(r["votes"] > 0 for r in res["categories"].values())
    assert res["agreement"]["krippendorff_alpha"] is not None and 0 < res["agreement"]["krippendorff_alpha"] < 1
    assert res["self_consistency"]["repeats"] == 60 * 2
    assert [(a["higher"], a["lower"]) for a in res["adjacent"]] == [("slow8", "mid4"), ("mid4", "fast2")]
    assert all(a["votes_needed"] is not None for a in res["adjacent"])
    # keeping the liar mixes random answers in
    loose = compute_results(study, resamples=1000, max_gold_failure=1.0)
    assert loose["excluded_annotators"] == 0 and loose["votes"] == 61 * 16


def test_agreement_of_certain_annotators(study):
    _simulate(study, annotators=8, seed=1, certain=True)
    res = compute_results(study, resamples=1000)
    assert res["agreement"]["krippendorff_alpha"] == pytest.approx(1.0)
    assert res["self_consistency"] == {"repeats": 16, "agreement": 1.0}
    assert res["ranking"] == ["slow8", "mid4", "fast2"]


def test_oracle_and_results_cli(study, tmp_path, capsys):
    assert main(["study", "oracle", str(study), "--annotators", "4", "--votes-per-annotator", "10"]) == 0
    assert "4 simulated annotators cast 40 votes" in capsys.readouterr().out
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    assert main(["study", "results", str(study), "--json", str(out_json), "--html", str(out_html)]) == 0
    res = json.loads(out_json.read_text())
    assert res["votes"] == 4 * 8 and res["resamples"] == 1000
    assert res["gold"]["seen"] == 4 and res["gold"]["failed"] == 0  # the judge tells truth from mismatch
    for name in ("fast2", "mid4", "slow8"):
        m = res["models"][name]
        assert set(m) >= {"bt", "elo", "ci_low", "ci_high"} and m["ci_low"] <= m["elo"] <= m["ci_high"]
        assert m["nfe"] == {"fast2": 4, "mid4": 8, "slow8": 16}[name]  # teacher CFG: 2 evaluations per step
    html = out_html.read_text()
    assert "data:image/png;base64," in html and "Win rate" in html


def test_oracle_choice():
    from sd35flash.study.oracle import oracle_choice

    rng = random.Random(0)
    assert oracle_choice(True, False, rng) == "left" and oracle_choice(False, True, rng) == "right"
    picks = {oracle_choice(True, True, rng) for _ in range(50)} | {oracle_choice(False, False, rng) for _ in range(50)}
    assert picks == {"left", "right"}


@pytest.mark.parametrize("argv,message", [
    (["study", "serve", "/nonexistent/study"], "does not exist"),
    (["study", "results", "/nonexistent/study"], "does not exist"),
    (["study", "create", "--model", "a=/nonexistent/m", "--model", "b=/nonexistent/m", "--prompts", "shapes",
      "--out", "{tmp}/new"], "/nonexistent/m does not exist"),
    (["study", "create", "--model", "a={tmp}", "--model", "b={tmp}", "--prompts", "shapes",
      "--out", "{tmp}/new"], "failed to load"),
    (["study", "create", "--model", "bad name=/x", "--model", "b=/x", "--prompts", "shapes", "--out", "{tmp}/n"],
     "NAME=MODEL"),
    (["study", "create", "--model", "a=/x:four", "--model", "b=/x", "--prompts", "shapes", "--out", "{tmp}/n"],
     "steps must be an integer"),
    (["study", "create", "--model", "a=/x", "--prompts", "shapes", "--out", "{tmp}/n"], "at least two models"),
    (["study", "create", "--model", "a=/x", "--model", "b=/x", "--prompts", "{tmp}/none.txt", "--out", "{tmp}/n"],
     "does not exist"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_unreadable_secrets_and_bad_folders(study, tmp_path, capsys):
    (study / "invite_code").mkdir()  # not a readable file
    assert main(["study", "serve", str(study)]) == 2
    err = capsys.readouterr().err
    assert "invite_code" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    assert main(["study", "create", "--model", "a=/x", "--model", "b=/x", "--prompts", "shapes",
                 "--out", str(tmp_path / "full")]) == 2
    assert "not a study folder" in capsys.readouterr().err
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"
