"""Concurrent annotators over real HTTP: the load benchmark (``bench/study_load.py``) and the load
test drive a running server with this. Each annotator joins, then fetches and votes until its queue
is done, timing every request."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class LoadResult:
    """What the clients saw: acknowledged vote ids, per-request latencies (s) and failures."""

    vote_ids: list[int] = field(default_factory=list)
    annotators: list[str] = field(default_factory=list)
    vote_latency: list[float] = field(default_factory=list)
    next_latency: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def percentiles(self, which: str = "vote") -> dict[str, float]:
        lat = np.asarray(self.vote_latency if which == "vote" else self.next_latency) * 1000
        if lat.size == 0:
            return {"p50_ms": float("nan"), "p95_ms": float("nan"), "max_ms": float("nan")}
        return {"p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                "max_ms": float(lat.max())}


def annotate(url: str, invite: str, result: LoadResult, seed: int, annotator: str | None = None,
             stop: threading.Event | None = None) -> str | None:
    """One annotator: join (unless ``annotator`` is given, to resume), then vote until 204.

    Returns the annotator id; a connection failure ends the run quietly (recorded in ``errors``)."""
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=60.0) as c:
        try:
            if annotator is None:
                r = c.post("/api/session", json={"invite": invite})
                r.raise_for_status()
                annotator = r.json()["annotator"]
                with result.lock:
                    result.annotators.append(annotator)
            while stop is None or not stop.is_set():
                t0 = time.perf_counter()
                r = c.get("/api/next", params={"annotator": annotator})
                t1 = time.perf_counter()
                if r.status_code == 204:
                    break
                r.raise_for_status()
                pair = r.json()
                v = c.post("/api/vote", json={"annotator": annotator, "pair_id": pair["pair_id"],
                                              "choice": rng.choice(("left", "right", "tie"))})
                t2 = time.perf_counter()
                if v.status_code != 201:
                    raise RuntimeError(f"vote answered {v.status_code}: {v.text[:200]}")
                with result.lock:
                    result.vote_ids.append(int(v.json()["vote_id"]))
                    result.next_latency.append(t1 - t0)
                    result.vote_latency.append(t2 - t1)
        except (httpx.HTTPError, RuntimeError) as exc:
            with result.lock:
                result.errors.append(f"{type(exc).__name__}: {exc}")
    return annotator


def run_load(url: str, invite: str, annotators: int, seed: int = 0, resume: list[str] | None = None,
             result: LoadResult | None = None, stop: threading.Event | None = None) -> LoadResult:
    """``annotators`` concurrent clients (one thread each); ``resume`` continues existing annotators."""
    result = result or LoadResult()
    t0 = time.perf_counter()
    ids = resume or [None] * annotators
    with ThreadPoolExecutor(max_workers=len(ids)) as pool:
        futures = [pool.submit(annotate, url, invite, result, seed * 1000 + i, a, stop) for i, a in enumerate(ids)]
        for f in futures:
            f.result()
    result.seconds = time.perf_counter() - t0
    return result
