"""The study's HTTP API with an in-process client: joining, serving, voting, every error code, the
admin export, path confinement, escaping, the secret files and restart safety."""

from __future__ import annotations

import csv
import io
import json
import shutil
import stat

import pytest
from fastapi.testclient import TestClient

from sd35flash.study import db
from sd35flash.study.app import create_app
from sd35flash.study.folder import StudyFolder

MODEL_NAMES = ("fast2", "mid4", "slow8")


@pytest.fixture()
def study(smoke_study, tmp_path):
    dst = tmp_path / "study"
    shutil.copytree(smoke_study, dst)
    return dst


def _join(client, study):
    invite = StudyFolder(study).invite_code()
    r = client.post("/api/session", json={"invite": invite})
    assert r.status_code == 201
    return r.json()["annotator"]


def test_create_layout(study):
    m = StudyFolder(study).manifest()
    assert list(m["models"]) == list(MODEL_NAMES)
    assert [m["models"][n]["steps"] for n in MODEL_NAMES] == [2, 4, 8]
    assert all(m["models"][n]["seconds_per_image"] > 0 for n in MODEL_NAMES)
    model_pairs = [p for p in m["pairs"] if p["kind"] == "model"]
    assert len(model_pairs) == 5 * 2 * 3  # prompts x seeds x model pairs
    gold = [p for p in m["pairs"] if p["kind"] == "gold"]
    assert gold and all(p["correct"] in ("a", "b") for p in gold)
    names = {f.name for f in (study / "images").iterdir()}
    for p in m["pairs"]:
        assert p["img_a"] in names and p["img_b"] in names
        assert not any(n in p["img_a"] + p["img_b"] for n in MODEL_NAMES)
    import numpy as np
    from PIL import Image

    from sd35flash.world import SceneSpec, judge

    def load(name):
        return np.asarray(Image.open(study / "images" / name).convert("RGB"), dtype=np.int16)

    # same prompt and seed, another step count: close (same noise) but not the same image
    for p in model_pairs[:6]:
        diff = np.abs(load(p["img_a"]) - load(p["img_b"])).mean()
        assert 0 < diff < 40
    assert {p["a"] for p in model_pairs} == set(MODEL_NAMES)  # a/b order is random
    # the judge accepts the truth side of every gold pair and rejects the other
    specs = {p["id"]: SceneSpec.from_dict(p["spec"]) for p in m["prompts"]}
    for g in gold:
        truth = g["img_a"] if g["correct"] == "a" else g["img_b"]
        wrong = g["img_b"] if g["correct"] == "a" else g["img_a"]
        assert judge(load(truth).astype(np.uint8), specs[g["prompt_id"]]).correct
        assert not judge(load(wrong).astype(np.uint8), specs[g["prompt_id"]]).correct


def test_create_is_resumable_and_refuses_another_study(smoke_study, smoke_teacher, tmp_path):
    from sd35flash.errors import UserError
    from sd35flash.study.create import ModelArg, create_study

    dst = tmp_path / "s"
    shutil.copytree(smoke_study, dst)
    (dst / "manifest.json").unlink()
    victim = sorted((dst / "images").iterdir())[0]
    victim.unlink()
    models = [ModelArg("fast2", str(smoke_teacher), 2), ModelArg("mid4", str(smoke_teacher), 4),
              ModelArg("slow8", str(smoke_teacher), 8)]
    create_study(models, "shapes", dst, seeds=2, num_prompts=5, progress=False)
    assert victim.is_file() and (dst / "manifest.json").is_file()
    other = tmp_path / "o"
    shutil.copytree(smoke_study, other)
    (other / "manifest.json").unlink()
    with pytest.raises(UserError, match="different study"):
        create_study(models[:2], "shapes", other, seeds=2, num_prompts=5, progress=False)


def test_vote_flow_and_error_codes(study):
    with TestClient(create_app(study, db.Protocol(votes_per_annotator=10, gold_share=0.2, repeat_share=0.2))) as c:
        assert c.post("/api/session", json={"invite": "wrong"}).status_code == 403
        assert c.post("/api/session", json={}).status_code == 422
        ann = _join(c, study)
        assert c.get("/api/next", params={"annotator": "nobody"}).status_code == 403
        seen, kinds = [], []
        con = db.connect(study / "votes.sqlite3")
        assert db.journal_mode(con) == "wal"
        for i in range(10):
            r = c.get("/api/next", params={"annotator": ann})
            assert r.status_code == 200
            pair = r.json()
            assert set(pair) == {"pair_id", "prompt", "left", "right", "done", "total"}
            assert pair["done"] == i and pair["total"] == 10
            assert pair["left"].startswith("/img/") and c.get(pair["left"]).headers["content-type"] == "image/png"
            assert not any(n in json.dumps(pair) for n in MODEL_NAMES)
            v = c.post("/api/vote", json={"annotator": ann, "pair_id": pair["pair_id"], "choice": "left"})
            assert v.status_code == 201 and isinstance(v.json()["vote_id"], int)
            dup = c.post("/api/vote", json={"annotator": ann, "pair_id": pair["pair_id"], "choice": "right"})
            assert dup.status_code == 409
            seen.append(pair["pair_id"])
            kinds.append(con.execute("SELECT kind FROM pairs WHERE pair_id = ?", (pair["pair_id"],)).fetchone()[0])
        assert c.get("/api/next", params={"annotator": ann}).status_code == 204
        assert len(set(seen)) == 10  # a repeat comes under its own pair_id
        assert kinds.count("gold") == 2 and kinds.count("repeat") == 2
        body = {"annotator": ann, "pair_id": seen[0], "choice": "left"}
        assert c.post("/api/vote", json={**body, "annotator": "nobody"}).status_code == 403
        assert c.post("/api/vote", json={**body, "choice": "both"}).status_code == 422
        assert c.post("/api/vote", json={"annotator": ann}).status_code == 422
        assert c.post("/api/vote", content=b"not json", headers={"content-type": "application/json"}).status_code == 422
        assert c.post("/api/vote", json={**body, "extra": 1}).status_code == 422
        assert c.post("/api/vote", json={**body, "pair_id": "ffffffffffff"}).status_code == 404
        con.close()


def test_sides_follow_the_stored_swap(study):
    """'left' is stored as the winner side of the pair actually shown on the left."""
    with TestClient(create_app(study)) as c:
        ann = _join(c, study)
        con = db.connect(study / "votes.sqlite3")
        swaps = set()
        for _ in range(8):
            pair = c.get("/api/next", params={"annotator": ann}).json()
            row = con.execute("SELECT s.swap, p.img_a, p.img_b FROM assignments s JOIN pairs p USING (pair_id) "
                              "WHERE s.annotator = ? AND s.pair_id = ?", (ann, pair["pair_id"])).fetchone()
            left_img = pair["left"].removeprefix("/img/")
            assert left_img == (row["img_b"] if row["swap"] else row["img_a"])
            c.post("/api/vote", json={"annotator": ann, "pair_id": pair["pair_id"], "choice": "left"})
            winner = con.execute("SELECT winner FROM votes WHERE pair_id = ?", (pair["pair_id"],)).fetchone()[0]
            assert winner == ("b" if row["swap"] else "a")
            swaps.add(row["swap"])
        assert swaps == {0, 1}
        con.close()


def test_admin_export_and_summary(study):
    with TestClient(create_app(study)) as c:
        ann = _join(c, study)
        pair = c.get("/api/next", params={"annotator": ann}).json()
        c.post("/api/vote", json={"annotator": ann, "pair_id": pair["pair_id"], "choice": "tie"})
        assert c.get("/api/admin/votes.csv").status_code == 401
        assert c.get("/api/admin/votes.csv", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/api/admin/summary").status_code == 401
        token = StudyFolder(study).admin_token()
        r = c.get("/api/admin/votes.csv", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert len(rows) == 1 and rows[0]["annotator"] == ann and rows[0]["choice"] == "tie"
        assert rows[0]["prompt"] == pair["prompt"]
        s = c.get("/api/admin/summary", headers={"Authorization": f"Bearer {token}"}).json()
        assert s["votes"] == 1 and s["annotators"][0]["votes"] == 1
        assert "Study admin" in c.get("/admin").text


def test_images_confined_to_the_study(study):
    (study.parent / "secret.png").write_bytes(b"x")
    with TestClient(create_app(study)) as c:
        for path in ("/img/../manifest.json", "/img/..%2Fmanifest.json", "/img/%2e%2e%2fadmin_token",
                     "/img/..%2F..%2Fsecret.png", "/img/manifest.json", "/img/votes.sqlite3",
                     "/img/" + "0" * 24 + ".png", "/img/%2Fetc%2Fpasswd"):
            r = c.get(path)
            assert r.status_code == 404, path
            assert b"invite" not in r.content and StudyFolder(study).admin_token().encode() not in r.content


def test_secret_files_and_escaping(study):
    with TestClient(create_app(study)) as c:
        for name in ("invite_code", "admin_token"):
            assert stat.S_IMODE((study / name).stat().st_mode) == 0o600
        page = c.get("/", params={"invite": '"><script>alert(1)</script>'}).text
        assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    before = StudyFolder(study).invite_code()
    with TestClient(create_app(study)):
        assert StudyFolder(study).invite_code() == before  # a restart keeps the code


def test_restart_keeps_votes(study):
    with TestClient(create_app(study)) as c:
        ann = _join(c, study)
        pair = c.get("/api/next", params={"annotator": ann}).json()
        c.post("/api/vote", json={"annotator": ann, "pair_id": pair["pair_id"], "choice": "right"})
    with TestClient(create_app(study)) as c:  # a new server on the same database
        nxt = c.get("/api/next", params={"annotator": ann}).json()
        assert nxt["done"] == 1 and nxt["pair_id"] != pair["pair_id"]
        assert c.post("/api/vote", json={"annotator": ann, "pair_id": pair["pair_id"],
                                         "choice": "left"}).status_code == 409


def test_unreadable_secret_is_a_user_error(study):
    from sd35flash.errors import UserError

    (study / "admin_token").write_text("")
    with pytest.raises(UserError, match="admin_token"):
        create_app(study)


def test_create_with_preset(smoke_teacher, tmp_path):
    """--preset loads every model as `generate --preset` does; reference-fp32 draws the same images as no preset,
    and a preset that frees its text encoders after encoding still draws every prompt."""
    import numpy as np
    from PIL import Image

    from sd35flash.study.create import ModelArg, create_study

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square on the left\n")
    models = [ModelArg("one", str(smoke_teacher), 1), ModelArg("two", str(smoke_teacher), 2)]
    out = {}
    for preset in (None, "reference-fp32", "laptop-8bit-no-t5"):
        d = tmp_path / str(preset)
        create_study(models, str(prompts), d, seeds=1, preset=preset, device="cpu", progress=False)
        m = StudyFolder(d).manifest()
        assert all(e["preset"] == preset for e in m["models"].values())
        pairs = sorted((p["prompt_id"], p["a"], p["img_a"]) for p in m["pairs"])
        out[preset] = [np.asarray(Image.open(d / "images" / img), dtype=np.int16) for _, _, img in pairs]
        assert len(out[preset]) == 2 and not any(p["kind"] == "gold" for p in m["pairs"])
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(out[None], out["reference-fp32"]))


def test_create_with_a_schedule(smoke_teacher, tmp_path, capsys):
    """`study create --schedule NAME=SPEC` samples that model on the given times (recorded in the manifest, NFE
    from its step count); an unknown name, a bad list and a step count that disagrees are one-line errors."""
    from sd35flash.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    d = tmp_path / "s"
    argv = ["study", "create", "--model", f"own={smoke_teacher}:4", "--model", f"fair={smoke_teacher}",
            "--prompts", str(prompts), "--seeds", "1", "--out", str(d), "--no-progress"]
    assert main([*argv, "--schedule", "fair=1,0.9,0.75,0.5,0"]) == 0
    m = StudyFolder(d).manifest()["models"]
    assert m["fair"]["schedule"] == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0]) and m["fair"]["steps"] == 4
    assert m["fair"]["nfe"] == 8 and m["own"]["schedule"] != m["fair"]["schedule"]
    capsys.readouterr()
    for extra, message in ((["--schedule", "nobody=1,0"], "no --model has that name; models: own, fair"),
                           (["--schedule", "fair=1,0.5"], "the last time must be 0"),
                           (["--schedule", "own=1,0.5,0"], "2 steps, but --model own asks for 4"),
                           (["--schedule", "fair"], "expects NAME=SPEC")):
        assert main([*argv[:-3], "--out", str(tmp_path / "x"), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
