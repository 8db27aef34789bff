"""Rating math: hand-computed cases, agreement with evalica / krippendorff, recovery of known strengths."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sd35flash.study import ratings


def test_bradley_terry_two_models_by_hand():
    # a beats b 3 times, b beats a once: p_a / p_b = 3, geometric mean 1 -> p = (sqrt 3, 1 / sqrt 3)
    w = ratings.win_counts([0, 0, 0, 0], [1, 1, 1, 1], ["a", "a", "a", "b"], 2)[0]
    p = ratings.bradley_terry(w, prior=0.0)
    assert p == pytest.approx([math.sqrt(3), 1 / math.sqrt(3)], rel=1e-8)
    elo = ratings.elo_scale(p)
    assert elo[0] - elo[1] == pytest.approx(400 * math.log10(3), rel=1e-8)
    assert elo.mean() == pytest.approx(1000.0)
    # a tie is half a win each way; side "a" of the third vote is model 1
    w = ratings.win_counts([0, 0, 1], [1, 1, 0], ["a", "tie", "a"], 2)[0]
    assert w.tolist() == [[0.0, 1.5], [1.5, 0.0]]


def test_bradley_terry_matches_evalica():
    import evalica

    xs = ["a", "a", "a", "b", "b", "a", "c", "c"]
    ys = ["b", "b", "c", "c", "c", "b", "a", "b"]
    ws = ["a", "a", "a", "a", "tie", "b", "b", "a"]
    code = {"a": evalica.Winner.X, "b": evalica.Winner.Y, "tie": evalica.Winner.Draw}
    ref = evalica.bradley_terry(xs, ys, [code[w] for w in ws], tolerance=1e-12, limit=100_000).scores
    idx = {"a": 0, "b": 1, "c": 2}
    w = ratings.win_counts([idx[x] for x in xs], [idx[y] for y in ys], ws, 3)[0]
    ours = ratings.bradley_terry(w, prior=0.0)
    ref_arr = np.array([ref["a"], ref["b"], ref["c"]])
    ref_arr /= np.exp(np.log(ref_arr).mean())
    assert ours == pytest.approx(ref_arr, rel=1e-6)


def test_krippendorff_alpha_by_hand():
    # units (1,1), (2,2), (1,2): D_o = 2/6, D_e = 2*3*3/(6*5) = 0.6 -> alpha = 1 - (1/3)/0.6 = 4/9 (nominal = ordinal
    # with two values)
    m = np.array([[1.0, 2.0, 1.0], [1.0, 2.0, 2.0]])
    assert ratings.krippendorff_alpha(m) == pytest.approx(4 / 9)
    assert ratings.krippendorff_alpha(np.array([[1.0, np.nan], [np.nan, 2.0]])) is None  # no shared unit


def _synthetic(strengths: np.ndarray, prompts: int, votes_per_prompt: int, seed: int):
    rng = np.random.default_rng(seed)
    m = len(strengths)
    a = rng.integers(0, m, prompts * votes_per_prompt)
    b = (a + rng.integers(1, m, a.size)) % m
    p_a = strengths[a] / (strengths[a] + strengths[b])
    win = np.where(rng.random(a.size) < p_a, "a", "b")
    groups = np.repeat(np.arange(prompts), votes_per_prompt)
    return ratings.win_counts(a, b, win, m, groups, prompts)


def test_known_strengths_recovered_with_calibrated_intervals():
    true = np.array([4.0, 2.0, 1.0, 0.5])
    true_elo = ratings.elo_scale(true / np.exp(np.log(true).mean()))
    covered = []
    for seed in range(20):
        wg = _synthetic(true, prompts=60, votes_per_prompt=20, seed=seed)
        elo = ratings.elo_scale(ratings.bradley_terry(wg.sum(axis=0)))
        assert np.argsort(-elo).tolist() == [0, 1, 2, 3]
        lo, hi = ratings.percentile_ci(ratings.bootstrap_elo(wg, 1000, seed=seed))
        assert np.all(lo < elo) and np.all(elo < hi)
        covered.append((lo <= true_elo) & (true_elo <= hi))
    coverage = np.mean(covered)
    assert 0.85 <= coverage <= 1.0, coverage  # nominal 95%


def test_intervals_shrink_with_more_votes():
    true = np.array([2.0, 1.0])
    widths = []
    for votes in (5, 80):
        wg = _synthetic(true, prompts=40, votes_per_prompt=votes, seed=1)
        lo, hi = ratings.percentile_ci(ratings.bootstrap_elo(wg, 1000, seed=0))
        widths.append(hi[0] - lo[0])
    assert widths[1] < widths[0] / 2.5  # ~ 1 / sqrt(16) = 1/4


def test_votes_to_separate():
    # q = 0.6: n = 1.96^2 * 0.24 / 0.01 = 92.2 -> 93 votes, 33 more after 60
    assert ratings.votes_to_separate(0.6, 0.4, 60) == 33
    assert ratings.votes_to_separate(0.6, 0.4, 500) == 0
    assert ratings.votes_to_separate(1.0, 1.0, 10) is None


def test_win_rates():
    w = np.array([[0.0, 3.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    r = ratings.win_rates(w)
    assert r[0, 1] == 0.75 and r[1, 0] == 0.25 and np.isnan(r[0, 2]) and np.isnan(r[0, 0])
