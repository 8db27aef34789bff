"""The annotator page in headless Chromium (Debian's, driven by Playwright; no browser download):
joining, 10 votes by mouse and keyboard, the progress bar, the thank-you page, no model names in
the page, and prompts shown as text. Screenshots go to $STUDY_SHOTS (default /tmp/study-shots)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sd35flash.study import db
from sd35flash.study.app import create_app
from sd35flash.study.folder import StudyFolder
from study_server import thread_server

pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system chromium (apt-get install chromium)")
SHOTS = Path(os.environ.get("STUDY_SHOTS", "/tmp/study-shots"))
MODEL_NAMES = ("fast2", "mid4", "slow8")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _progress(page) -> tuple[str, str]:
    return page.locator("#progress-text").inner_text(), page.locator("#progress").get_attribute("aria-valuenow")


@pytest.mark.parametrize("width,height,name", [(1366, 700, "desktop"), (390, 844, "phone")])
def test_annotator_page(browser, smoke_study, smoke_teacher, tmp_path, width, height, name):
    study = tmp_path / "study"
    shutil.copytree(smoke_study, study)
    SHOTS.mkdir(parents=True, exist_ok=True)
    app = create_app(study, db.Protocol(votes_per_annotator=10, gold_share=0.1, repeat_share=0.1))
    invite = StudyFolder(study).invite_code()
    with thread_server(app) as url:
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url + "/")
        page.screenshot(path=str(SHOTS / f"{name}-join.png"))
        page.fill("#invite", "wrong-code")
        page.click("#join-button")
        page.wait_for_function("document.getElementById('join-error').textContent.length > 0")
        page.fill("#invite", invite)
        page.click("#join-button")
        page.wait_for_selector("#vote:not(.hidden)")
        page.wait_for_function("document.getElementById('left').complete && document.getElementById('right').complete")
        page.screenshot(path=str(SHOTS / f"{name}-vote.png"), full_page=True)
        assert _progress(page) == ("0 of 10 done", "0")
        for sel in ("#prompt", "#left", "#right", "#choose-left", "#choose-tie", "#choose-right"):
            box = page.locator(sel).bounding_box()  # everything needed to vote is on screen, unscrolled
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width
            assert box["y"] >= 0 and box["y"] + box["height"] <= height, sel
        left, right = page.locator("#left").bounding_box(), page.locator("#right").bounding_box()
        assert left["width"] >= 140 and abs(left["width"] - right["width"]) < 1 and left["y"] == right["y"]
        for i in range(10):
            text, _ = _progress(page)
            assert text == f"{i} of 10 done"
            fill = page.eval_on_selector("#progress-fill", "e => parseFloat(e.style.width)")
            assert float(fill) == pytest.approx(10 * i)
            html = page.content()
            assert not any(n in html for n in MODEL_NAMES) and str(smoke_teacher) not in html
            assert page.locator("#prompt").inner_text().strip()
            if i % 2 == 0:  # mouse
                page.click(["#choose-left", "#choose-tie", "#choose-right"][i % 3])
            else:  # keyboard
                page.keyboard.press(["ArrowLeft", "ArrowDown", "ArrowRight", "1", "3"][i % 5])
            if i < 9:
                page.wait_for_function(f"document.getElementById('progress-text').textContent.startsWith('{i + 1} of')")
        page.wait_for_selector("#thanks:not(.hidden)")
        page.screenshot(path=str(SHOTS / f"{name}-thanks.png"))
        assert "Thank you" in page.inner_text("#thanks")
        con = db.connect(study / "votes.sqlite3")
        rows = con.execute("SELECT choice FROM votes").fetchall()
        con.close()
        assert len(rows) == 10
        assert {r[0] for r in rows} == {"left", "right", "tie"}
        page.close()


def test_prompt_text_is_escaped(browser, smoke_teacher, tmp_path):
    from sd35flash.study.create import ModelArg, create_study

    evil = '<img src=x onerror="document.title=\'pwned\'"> <b>bold</b> & more'
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(evil + "\n")
    study = tmp_path / "study"
    create_study([ModelArg("one", str(smoke_teacher), 1), ModelArg("two", str(smoke_teacher), 2)], str(prompts),
                 study, seeds=1, progress=False)
    with thread_server(create_app(study)) as url:
        page = browser.new_page()
        page.goto(url + "/?invite=" + StudyFolder(study).invite_code())
        page.click("#join-button")
        page.wait_for_selector("#vote:not(.hidden)")
        assert page.locator("#prompt").inner_text() == evil
        assert page.locator("#prompt b").count() == 0 and page.locator("#prompt img").count() == 0
        assert page.title() != "pwned"
        page.close()


def test_admin_page(browser, smoke_study, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(smoke_study, study)
    app = create_app(study)
    token = StudyFolder(study).admin_token()
    with thread_server(app) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(url + "/admin")
        page.fill("#token", "wrong")
        page.click("#token-form button")
        page.wait_for_function("document.getElementById('admin-error').textContent.includes('Wrong')")
        page.fill("#token", token)
        page.click("#token-form button")
        page.wait_for_selector("#admin-data:not(.hidden)")
        assert page.inner_text("#total-votes") == "0"
        import httpx  # two annotators vote; the page shows them at its next refresh

        for _ in range(2):
            invite = StudyFolder(study).invite_code()
            ann = httpx.post(url + "/api/session", json={"invite": invite}).json()["annotator"]
            for _ in range(3):
                pair = httpx.get(url + "/api/next", params={"annotator": ann}).json()
                httpx.post(url + "/api/vote", json={"annotator": ann, "pair_id": pair["pair_id"], "choice": "left"})
        page.click("#token-form button")
        page.wait_for_function("document.getElementById('total-votes').textContent === '6'")
        assert page.locator("#annotator-rows tr").count() == 2
        assert page.locator("#pair-rows tr").count() >= 1
        page.screenshot(path=str(SHOTS / "admin.png"), full_page=True)
        page.close()
