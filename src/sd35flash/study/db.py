"""The vote store: SQLite in WAL mode, one connection per request, every vote committed at once.

Tables:

- ``pairs``: the study's pairs (model and gold pairs from the manifest, and the repeats made for
  each annotator, each under its own ``pair_id`` with ``repeat_of`` naming the original);
- ``annotators``: one row per joined annotator (the id is a random token);
- ``assignments``: each annotator's queue of pairs, in serving order, with the side swap;
- ``votes``: one row per vote, ``UNIQUE (annotator, pair_id)``: a second vote is refused.

A vote is durable once ``record_vote`` returns (``synchronous=FULL``): a crash of the server loses
no stored vote, and a restart on the same file carries on.
"""

from __future__ import annotations

import random
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    pair_id TEXT PRIMARY KEY, kind TEXT NOT NULL, prompt_id TEXT NOT NULL, seed_index INTEGER NOT NULL,
    a TEXT NOT NULL, b TEXT NOT NULL, img_a TEXT NOT NULL, img_b TEXT NOT NULL, correct TEXT,
    repeat_of TEXT REFERENCES pairs(pair_id));
CREATE TABLE IF NOT EXISTS annotators (
    annotator TEXT PRIMARY KEY, created REAL NOT NULL, total INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    annotator TEXT NOT NULL REFERENCES annotators(annotator), position INTEGER NOT NULL,
    pair_id TEXT NOT NULL REFERENCES pairs(pair_id), swap INTEGER NOT NULL,
    PRIMARY KEY (annotator, position), UNIQUE (annotator, pair_id));
CREATE TABLE IF NOT EXISTS votes (
    vote_id INTEGER PRIMARY KEY AUTOINCREMENT, annotator TEXT NOT NULL REFERENCES annotators(annotator),
    pair_id TEXT NOT NULL REFERENCES pairs(pair_id), choice TEXT NOT NULL, winner TEXT NOT NULL,
    created REAL NOT NULL, UNIQUE (annotator, pair_id));
"""

CHOICES = ("left", "right", "tie")


@dataclass
class Protocol:
    """How many pairs each annotator sees, and which share are gold pairs and repeats."""

    votes_per_annotator: int = 20
    gold_share: float = 0.1
    repeat_share: float = 0.1

    def counts(self, model_pairs: int, gold_pairs: int) -> tuple[int, int, int]:
        """(model, gold, repeat) pairs for one annotator; repeats re-serve model pairs of the same queue."""
        n = self.votes_per_annotator
        gold = min(gold_pairs, round(n * self.gold_share))
        rep = round(n * self.repeat_share)
        model = min(model_pairs, n - gold - rep)
        return model, gold, min(rep, model)


class DuplicateVote(Exception):
    """The annotator already voted on this pair."""


class UnknownPair(Exception):
    """The pair is not in this annotator's queue."""


def connect(path: str | Path) -> sqlite3.Connection:
    con = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA busy_timeout = 30000")
    con.execute("PRAGMA synchronous = FULL")
    con.execute("PRAGMA foreign_keys = ON")
    return con


def init_db(path: str | Path, manifest: dict[str, Any]) -> None:
    """Create the tables (WAL mode) and load the manifest's pairs; safe to run on an existing file."""
    con = connect(path)
    try:
        con.execute("PRAGMA journal_mode = WAL")
        con.executescript(SCHEMA)
        con.execute("BEGIN IMMEDIATE")
        con.executemany(
            "INSERT OR IGNORE INTO pairs (pair_id, kind, prompt_id, seed_index, a, b, img_a, img_b, correct) "
            "VALUES (:pair_id, :kind, :prompt_id, :seed_index, :a, :b, :img_a, :img_b, :correct)",
            manifest["pairs"])
        con.execute("COMMIT")
    finally:
        con.close()


def journal_mode(con: sqlite3.Connection) -> str:
    return str(con.execute("PRAGMA journal_mode").fetchone()[0])


def create_annotator(con: sqlite3.Connection, protocol: Protocol, rng: random.Random | None = None) -> str:
    """Join a new annotator and fill their queue; returns the annotator id.

    Model pairs go to whoever has seen them least (fewest assignments first, ties at random), so votes
    spread evenly over pairs. Gold pairs are drawn at random. Each repeat re-serves one of the
    annotator's model pairs under a fresh ``pair_id``, placed after the original. Order and sides are
    random per annotator."""
    rng = rng or random.Random(secrets.randbits(64))
    annotator = secrets.token_urlsafe(16)
    con.execute("BEGIN IMMEDIATE")
    try:
        load = con.execute(
            "SELECT p.pair_id, p.kind, COUNT(s.pair_id) AS n FROM pairs p LEFT JOIN assignments s "
            "ON s.pair_id = p.pair_id WHERE p.repeat_of IS NULL GROUP BY p.pair_id").fetchall()
        model = [(r["n"], rng.random(), r["pair_id"]) for r in load if r["kind"] == "model"]
        gold = [r["pair_id"] for r in load if r["kind"] == "gold"]
        n_model, n_gold, n_rep = protocol.counts(len(model), len(gold))
        chosen = [pid for _, _, pid in sorted(model)[:n_model]]
        queue = chosen + rng.sample(gold, n_gold)
        rng.shuffle(queue)
        for orig in rng.sample(chosen, n_rep):
            rid = secrets.token_hex(6)
            con.execute("INSERT INTO pairs (pair_id, kind, prompt_id, seed_index, a, b, img_a, img_b, correct, "
                        "repeat_of) SELECT ?, 'repeat', prompt_id, seed_index, a, b, img_a, img_b, correct, pair_id "
                        "FROM pairs WHERE pair_id = ?", (rid, orig))
            after = queue.index(orig) + 1
            queue.insert(rng.randint(after, len(queue)), rid)
        con.execute("INSERT INTO annotators (annotator, created, total) VALUES (?, ?, ?)",
                    (annotator, time.time(), len(queue)))
        con.executemany("INSERT INTO assignments (annotator, position, pair_id, swap) VALUES (?, ?, ?, ?)",
                        [(annotator, i, pid, int(rng.random() < 0.5)) for i, pid in enumerate(queue)])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return annotator


def annotator_exists(con: sqlite3.Connection, annotator: str) -> bool:
    return con.execute("SELECT 1 FROM annotators WHERE annotator = ?", (annotator,)).fetchone() is not None


def next_pair(con: sqlite3.Connection, annotator: str) -> tuple[sqlite3.Row | None, int, int]:
    """(the first unvoted assignment joined with its pair or ``None``, votes done, queue length)."""
    row = con.execute(
        "SELECT s.position, s.swap, p.* FROM assignments s JOIN pairs p ON p.pair_id = s.pair_id "
        "LEFT JOIN votes v ON v.annotator = s.annotator AND v.pair_id = s.pair_id "
        "WHERE s.annotator = ? AND v.vote_id IS NULL ORDER BY s.position LIMIT 1", (annotator,)).fetchone()
    total = con.execute("SELECT total FROM annotators WHERE annotator = ?", (annotator,)).fetchone()[0]
    done = con.execute("SELECT COUNT(*) FROM votes WHERE annotator = ?", (annotator,)).fetchone()[0]
    return row, int(done), int(total)


def record_vote(con: sqlite3.Connection, annotator: str, pair_id: str, choice: str) -> int:
    """Store one vote; ``winner`` is the side of the stored pair it picks (``a``, ``b`` or ``tie``).

    Raises :class:`UnknownPair` for a pair outside the annotator's queue and :class:`DuplicateVote`
    for a second vote (the UNIQUE constraint decides, so concurrent duplicates cannot both land)."""
    if choice not in CHOICES:
        raise ValueError(choice)
    row = con.execute("SELECT swap FROM assignments WHERE annotator = ? AND pair_id = ?",
                      (annotator, pair_id)).fetchone()
    if row is None:
        raise UnknownPair(pair_id)
    left, right = ("b", "a") if row["swap"] else ("a", "b")
    winner = {"left": left, "right": right, "tie": "tie"}[choice]
    try:
        cur = con.execute("INSERT INTO votes (annotator, pair_id, choice, winner, created) VALUES (?, ?, ?, ?, ?)",
                          (annotator, pair_id, choice, winner, time.time()))
    except sqlite3.IntegrityError:
        raise DuplicateVote(pair_id) from None
    return int(cur.lastrowid)


VOTE_COLUMNS = ("vote_id", "created", "annotator", "pair_id", "kind", "repeat_of", "prompt_id", "seed_index", "a", "b",
                "choice", "winner", "correct")


def all_votes(con: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every vote joined with its pair, oldest first (the CSV export and ``study results`` read this)."""
    rows = con.execute(
        "SELECT v.vote_id, v.created, v.annotator, v.pair_id, p.kind, p.repeat_of, p.prompt_id, p.seed_index, "
        "p.a, p.b, v.choice, v.winner, p.correct FROM votes v JOIN pairs p ON p.pair_id = v.pair_id "
        "ORDER BY v.vote_id").fetchall()
    return [dict(r) for r in rows]


def summary(con: sqlite3.Connection) -> dict[str, Any]:
    """Live counts for the admin page: votes per model pair and per annotator (with gold failures)."""
    per_pair = con.execute(
        "SELECT CASE WHEN p.a < p.b THEN p.a ELSE p.b END AS m1, CASE WHEN p.a < p.b THEN p.b ELSE p.a END AS m2, "
        "COUNT(*) AS votes, SUM(v.winner = 'tie') AS ties FROM votes v JOIN pairs p ON p.pair_id = v.pair_id "
        "WHERE p.kind = 'model' GROUP BY m1, m2 ORDER BY m1, m2").fetchall()
    per_annotator = con.execute(
        "SELECT a.annotator, a.created, a.total, COUNT(v.vote_id) AS votes, "
        "SUM(p.kind = 'gold') AS gold, SUM(p.kind = 'gold' AND v.winner != p.correct) AS gold_failed "
        "FROM annotators a LEFT JOIN votes v ON v.annotator = a.annotator "
        "LEFT JOIN pairs p ON p.pair_id = v.pair_id GROUP BY a.annotator ORDER BY a.created").fetchall()
    total = con.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
    return {"votes": int(total),
            "pairs": [{"models": [r["m1"], r["m2"]], "votes": r["votes"], "ties": r["ties"] or 0} for r in per_pair],
            "annotators": [{"annotator": r["annotator"], "votes": r["votes"], "total": r["total"],
                            "gold": r["gold"] or 0, "gold_failed": r["gold_failed"] or 0} for r in per_annotator]}
