"""Fast tests of the shapes world: specs, prompts, splits, renderer and judge."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from sd35flash.errors import SpecError, UserError
from sd35flash.world import (
    CATEGORIES,
    HELDOUT_PAIRS,
    IMAGE_SIZE,
    ObjectSpec,
    SceneSpec,
    all_words,
    canonical_prompt,
    degrade,
    judge,
    junk_image,
    paraphrase,
    random_spec,
    read_jsonl,
    render,
    render_with_layout,
    run_selftest,
    split_specs,
    write_jsonl,
)

Obj = ObjectSpec


def _relation_spec(relation: str = "left_of") -> SceneSpec:
    return SceneSpec("relation", (Obj("circle", "red", "large"), Obj("square", "blue", None)), relation=relation)


# ----------------------------------------------------------------------------- specs


def test_spec_dict_matches_design_format() -> None:
    d = _relation_spec().to_dict()
    assert d == {
        "category": "relation",
        "objects": [
            {"shape": "circle", "color": "red", "size": "large"},
            {"shape": "square", "color": "blue", "size": None},
        ],
        "relation": "left_of",
        "position": None,
        "count": None,
    }
    assert SceneSpec.from_dict(json.loads(json.dumps(d))) == _relation_spec()


def test_jsonl_round_trip(tmp_path) -> None:
    specs = split_specs("train", 25) + split_specs("heldout", 5)
    path = tmp_path / "sub" / "specs.jsonl"
    write_jsonl(path, specs)
    assert read_jsonl(path) == specs
    assert [p.name for p in path.parent.iterdir()] == ["specs.jsonl"]  # no temp file left behind


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("{not json", "invalid JSON"),
        ('{"category": "blob", "objects": []}', "category"),
        ('{"category": "single_object", "objects": [{"shape": "hexagon", "color": "red"}]}', "shape"),
        ('{"category": "single_object", "objects": [{"shape": "circle", "color": "pink"}]}', "color"),
        ('{"category": "single_object", "objects": [{"shape": "circle", "color": "red", "size": "huge"}]}', "size"),
        ('{"category": "single_object", "objects": [], "count": null}', "exactly 1"),
        ('{"category": "two_objects", "objects": [{"shape": "circle", "color": "red"}]}', "exactly 2"),
        ('{"category": "relation", "objects": [{"shape": "circle", "color": "red"}, '
         '{"shape": "square", "color": "blue"}]}', "relation"),
        ('{"category": "position", "objects": [{"shape": "circle", "color": "red"}], "position": "middle"}',
         "position"),
        ('{"category": "counting", "objects": [{"shape": "circle", "color": "red"}], "count": 4}', "count"),
        ('{"category": "counting", "objects": [{"shape": "circle", "color": "red"}], "count": 0}', "count"),
        ('{"category": "single_object", "objects": [{"shape": "circle", "color": "red"}], "count": 2}', "count"),
        ('{"category": "single_object", "objects": [{"shape": "circle", "color": "red"}], "colour": "red"}',
         "unknown key"),
        ('{"category": "single_object", "objects": [{"shape": "circle", "color": "red", "hue": 3}]}',
         "unknown object key"),
        ('[1, 2]', "JSON object"),
    ],
)
def test_malformed_line_raises_spec_error_with_line_number(tmp_path, line: str, fragment: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps(_relation_spec().to_dict())
    path.write_text(good + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(SpecError) as info:
        read_jsonl(path)
    msg = str(info.value)
    assert f"{path}:3:" in msg and fragment in msg
    assert "\n" not in msg
    assert isinstance(info.value, UserError)


def test_missing_and_empty_files_raise_spec_error(tmp_path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(SpecError, match="no specs"):
        read_jsonl(empty)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(SpecError):
        Obj("circle", "red", "medium")
    with pytest.raises(SpecError):
        SceneSpec("counting", (Obj("circle", "red"),), count=None)
    with pytest.raises(SpecError):
        SceneSpec("position", (Obj("circle", "red"),))


# ----------------------------------------------------------------------------- splits


def test_splits_are_deterministic_balanced_and_distinct() -> None:
    a = split_specs("train", 50, seed=0)
    assert a == split_specs("train", 50, seed=0)
    assert a != split_specs("train", 50, seed=1)
    assert a != split_specs("val", 50, seed=0)
    assert [s.category for s in a[:10]] == list(CATEGORIES) * 2
    with pytest.raises(SpecError, match="train, val, test, heldout"):
        split_specs("dev", 5)


def test_heldout_pairs_only_in_heldout_split() -> None:
    for split in ("train", "val", "test"):
        for s in split_specs(split, 400):
            assert not s.uses_heldout_pair()
            assert not any(o.pair in HELDOUT_PAIRS for o in s.objects)
    held = split_specs("heldout", 200)
    assert all(s.uses_heldout_pair() for s in held)
    assert {p for s in held for p in (o.pair for o in s.objects)} >= HELDOUT_PAIRS


def test_two_object_specs_use_distinct_pairs() -> None:
    for s in split_specs("train", 500) + split_specs("heldout", 200):
        if len(s.objects) == 2:
            assert s.objects[0].pair != s.objects[1].pair


# ----------------------------------------------------------------------------- prompts


def test_canonical_prompts() -> None:
    assert canonical_prompt(SceneSpec("single_object", (Obj("circle", "red", "large"),))) == "a large red circle"
    assert canonical_prompt(SceneSpec("single_object", (Obj("circle", "orange"),))) == "an orange circle"
    assert (canonical_prompt(SceneSpec("position", (Obj("square", "blue"),), position="left"))
            == "a blue square on the left")
    assert (
        canonical_prompt(SceneSpec("two_objects", (Obj("triangle", "yellow"), Obj("circle", "green"))))
        == "a yellow triangle and a green circle"
    )
    assert (
        canonical_prompt(SceneSpec("relation", (Obj("circle", "red"), Obj("square", "blue")), relation="left_of"))
        == "a red circle left of a blue square"
    )
    assert canonical_prompt(SceneSpec("counting", (Obj("diamond", "white"),), count=3)) == "three white diamonds"
    assert canonical_prompt(SceneSpec("counting", (Obj("diamond", "white"),), count=1)) == "one white diamond"
    assert canonical_prompt(SceneSpec("counting", (Obj("square", "red", "small"),), count=2)) == "two small red squares"


def test_paraphrases_use_only_vocabulary_words_and_include_canonical() -> None:
    words = set(all_words())
    assert all(w.isascii() and w == w.lower() and w.isalnum() for w in words)
    assert {"1", "2", "3", "one", "two", "three"} <= words
    rng = random.Random(0)
    for s in split_specs("train", 100) + split_specs("heldout", 20):
        seen = {paraphrase(s, rng) for _ in range(150)}
        assert canonical_prompt(s) in seen
        assert len(seen) > 3
        for p in seen:
            assert set(p.split()) <= words and "  " not in p


# ----------------------------------------------------------------------------- renderer


def test_render_is_deterministic() -> None:
    spec = _relation_spec()
    a, b = render(spec, 7), render(spec, 7)
    assert a.dtype == np.uint8 and a.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert a.tobytes() == b.tobytes()
    assert render(spec, 8).tobytes() != a.tobytes()
    assert render(spec, 7, size=96).shape == (96, 96, 3)


def test_layout_obeys_rules() -> None:
    rng = random.Random(1)
    for i in range(300):
        spec = random_spec(CATEGORIES[i % len(CATEGORIES)], rng)
        _, placed = render_with_layout(spec, i)
        expect = spec.count if spec.category == "counting" else len(spec.objects)
        assert len(placed) == expect
        for p, o in zip(placed, spec.objects * len(placed)):
            assert o.size is None or p.size == o.size
            lo, hi = (12, 15) if p.size == "small" else (22, 28)
            assert lo - 1e-6 <= p.extent <= hi + 1e-6
            assert p.extent / 2 <= min(p.center) and max(p.center) <= IMAGE_SIZE - p.extent / 2
        for a in range(len(placed)):
            for b in range(a + 1, len(placed)):
                pa, pb = placed[a], placed[b]
                gap = max(abs(pa.center[k] - pb.center[k]) - (pa.extent + pb.extent) / 2 for k in (0, 1))
                assert gap >= 3.0
        if spec.category == "position":
            cx, cy = placed[0].center
            assert {"left": cx < 0.4 * 64, "right": cx > 0.6 * 64,
                    "top": cy < 0.4 * 64, "bottom": cy > 0.6 * 64}[spec.position]
        if spec.category == "relation":
            (x0, y0), (x1, y1) = placed[0].center, placed[1].center
            main, off = {"left_of": (x1 - x0, y1 - y0), "right_of": (x0 - x1, y1 - y0),
                         "above": (y1 - y0, x1 - x0), "below": (y0 - y1, x1 - x0)}[spec.relation]
            assert main >= 16 and abs(off) < main


# ----------------------------------------------------------------------------- judge


def test_judge_accepts_render_and_rejects_obvious_mismatches() -> None:
    spec = _relation_spec("left_of")
    img = render(spec, 3)
    v = judge(img, spec)
    assert v.correct and set(v.checks) == {"colors", "count", "presence", "relation", "size"}
    assert not judge(img, _relation_spec("right_of")).correct
    assert not judge(img, _relation_spec("above")).correct
    assert not judge(img, SceneSpec("single_object", (Obj("circle", "red"),))).correct
    blank = np.zeros_like(img)
    assert not judge(blank, spec).correct and not judge(blank, spec).checks["colors"]
    # float images in [0, 1] are accepted too
    assert judge(img.astype(np.float32) / 255.0, spec).correct


def test_judge_selftest_small_sample() -> None:
    report = run_selftest(20, seed=0)
    assert report["num"] == 20 and set(report["per_category"]) == set(CATEGORIES)
    assert report["accuracy"] >= 0.95
    assert report["false_accept"] <= 0.05
    assert report["junk_accept"] <= 0.10
    for cat, r in report["per_category"].items():
        assert r["accuracy"] >= 0.95, cat
        assert r["false_accept"] <= 0.1, cat


def test_judge_tolerates_blur_and_noise() -> None:
    rng = random.Random(2)
    nrng = np.random.default_rng(2)
    ok = []
    for i in range(40):
        spec = random_spec(CATEGORIES[i % len(CATEGORIES)], rng)
        ok.append(judge(degrade(render(spec, i), nrng), spec).correct)
    assert np.mean(ok) >= 0.95


def test_junk_is_rejected() -> None:
    rng = random.Random(4)
    nrng = np.random.default_rng(4)
    accepted = [judge(junk_image(s, nrng), s).correct for s in (random_spec(c, rng) for c in CATEGORIES * 10)]
    assert np.mean(accepted) <= 0.1
