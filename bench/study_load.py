"""Load benchmark of the study server: N concurrent annotators x M votes against a real local
`sd35flash study serve` process on 127.0.0.1, on a copy of a study folder.

Reports p50/p95 latency of POST /api/vote and GET /api/next, throughput, the CPU time of server and
clients (on a shared machine latency mostly measures waiting for a core; CPU time does not), and checks that no vote was
lost or doubled: the database holds exactly N x M votes, one per (annotator, pair), and every vote
id a client got back is stored.

Usage: python bench/study_load.py --study DIR [--annotators 50 --votes 20] [--json OUT]
(DIR is any finished study, e.g. from `sd35flash study create`; it is copied, not modified.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from sd35flash.io import atomic_write_text
from sd35flash.paths import git_commit
from sd35flash.study import db
from sd35flash.study.folder import StudyFolder
from sd35flash.study.loadgen import run_load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", required=True)
    ap.add_argument("--annotators", type=int, default=50)
    ap.add_argument("--votes", type=int, default=20)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)
    src = StudyFolder(args.study)
    src.manifest()
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study"
        shutil.copytree(src.root, study, ignore=shutil.ignore_patterns("votes.sqlite3*", "invite_code", "admin_token"))
        port = _free_port()
        before = os.times()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "sd35flash", "study", "serve", str(study), "--port", str(port),
                                 "--votes-per-annotator", str(args.votes)], env=dict(os.environ),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            else:
                raise SystemExit(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")
            res = run_load(url, StudyFolder(study).invite_code(), args.annotators)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        after = os.times()
        con = db.connect(study / "votes.sqlite3")
        rows = con.execute("SELECT vote_id, annotator, pair_id FROM votes").fetchall()
        con.close()
    expected = args.annotators * args.votes
    out = {
        "annotators": args.annotators, "votes_per_annotator": args.votes, "expected_votes": expected,
        "stored_votes": len(rows), "distinct_annotator_pair": len({(r[1], r[2]) for r in rows}),
        "acknowledged_not_stored": len(set(res.vote_ids) - {r[0] for r in rows}), "client_errors": len(res.errors),
        "vote": res.percentiles("vote"), "next": res.percentiles("next"), "seconds": res.seconds,
        "votes_per_second": len(res.vote_ids) / res.seconds if res.seconds else None,
        # CPU seconds the server process used (it is reaped above), and this process (the clients)
        "server_cpu_seconds": (after.children_user + after.children_system)
                              - (before.children_user + before.children_system),
        "client_cpu_seconds": (after.user + after.system) - (before.user + before.system),
        "commit": git_commit(), "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
    }
    ok = (out["stored_votes"] == expected == out["distinct_annotator_pair"] and not out["acknowledged_not_stored"]
          and not out["client_errors"])
    out["ok"] = ok
    text = json.dumps(out, indent=1)
    if args.json_out:
        atomic_write_text(args.json_out, text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
