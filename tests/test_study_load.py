"""A bounded load test on 127.0.0.1: concurrent annotators against the real `study serve` process,
a SIGKILL in the middle, a restart on the same database; no acknowledged vote is lost or doubled."""

from __future__ import annotations

import shutil
import signal
import threading
import time

import pytest

from sd35flash.study import db
from sd35flash.study.folder import StudyFolder
from sd35flash.study.loadgen import LoadResult, run_load
from study_server import free_port, start_process, wait_up

ANNOTATORS = 12
VOTES = 10


@pytest.mark.timeout(600)
def test_concurrent_votes_survive_a_crash(smoke_study, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(smoke_study, study)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ("--votes-per-annotator", str(VOTES))
    proc = start_process(study, port, *args)
    try:
        wait_up(url, proc=proc)
        invite = StudyFolder(study).invite_code()
        first = LoadResult()
        worker = threading.Thread(target=run_load, args=(url, invite, ANNOTATORS), kwargs={"result": first})
        worker.start()
        deadline = time.monotonic() + 120
        while len(first.vote_ids) < ANNOTATORS * VOTES // 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # crash mid-study
        proc.wait(timeout=30)
        said = proc.stdout.read()
        assert "admin_token" in said and "invite_code" in said  # where they are ...
        assert StudyFolder(study).admin_token() not in said and invite not in said  # ... never what they are
        worker.join(timeout=120)
        acked = set(first.vote_ids)
        assert 0 < len(acked) < ANNOTATORS * VOTES
        proc = start_process(study, port, *args)  # restart on the same database
        wait_up(url, proc=proc)
        con = db.connect(study / "votes.sqlite3")
        stored = {r[0] for r in con.execute("SELECT vote_id FROM votes")}
        assert acked <= stored  # every acknowledged vote survived the crash
        # the annotators carry on (any that had not joined before the crash join now)
        second = run_load(url, invite, 0, resume=first.annotators + [None] * (ANNOTATORS - len(first.annotators)))
        assert not second.errors, second.errors[:3]
        rows = con.execute("SELECT vote_id, annotator, pair_id FROM votes").fetchall()
        con.close()
        assert len(rows) == ANNOTATORS * VOTES == len({(r[1], r[2]) for r in rows})  # none lost, none doubled
        assert acked | set(second.vote_ids) <= {r[0] for r in rows}
    finally:
        proc.kill()
        proc.wait(timeout=30)
