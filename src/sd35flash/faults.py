"""Test hook for fault injection: a real ``SIGKILL`` at a named point of a run.

``SD35FLASH_FAULT_KILL_AT=<point>:<step>`` (or just ``<point>``) makes the process kill itself with
``SIGKILL`` when it reaches that point, exactly as ``kill -9`` from outside would: no exception
handler, ``finally`` clause or atexit hook runs. Points: ``vae``, ``flow`` and ``distill`` after
training step ``<step>`` (``train.logger.RunLogger.advance``), ``checkpoint`` in the middle of
saving checkpoint ``<step>`` (state written, meta and manifest not yet) and ``save-pipeline`` in the
middle of writing a model folder. ``tests/test_faults.py`` uses it to check that ``--resume`` after
a kill gives bit-identical weights. Unset (the normal case), it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "SD35FLASH_FAULT_KILL_AT"


def fault_point(point: str, step: int | None = None) -> None:
    """Kill this process with SIGKILL if ``$SD35FLASH_FAULT_KILL_AT`` names ``point`` (at ``step``)."""
    target = os.environ.get(ENV)
    if not target:
        return
    if target == point or (step is not None and target == f"{point}:{step}"):
        os.kill(os.getpid(), signal.SIGKILL)
