"""A real uvicorn server on 127.0.0.1 for the browser and load tests: in a thread, or as a process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, timeout: float = 240.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200. A server process that exits first fails at once with its stderr;
    the generous timeout covers a cold import on a loaded 2-core machine."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"server process exited with {proc.returncode} before answering: {err[-2000:]}")
        try:
            if httpx.get(url + "/", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server at {url} did not come up")


@contextlib.contextmanager
def thread_server(app):
    """``app`` served by uvicorn in a thread of this process; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url)
        yield url
    finally:
        server.should_exit = True
        t.join(timeout=10)


def start_process(study: Path, port: int, *extra: str) -> subprocess.Popen:
    """``sd35flash study serve`` as a child process (the real command line)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "sd35flash", "study", "serve", str(study), "--port", str(port),
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
