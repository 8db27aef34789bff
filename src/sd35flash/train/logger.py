"""Run logging: TensorBoard scalars/images (through accelerate's tracker), a JSONL metrics file
(read by reports to plot loss curves) and a tqdm progress bar with loss, it/s and ETA."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..faults import fault_point


class RunLogger:
    """Logs scalars to TensorBoard and ``metrics.jsonl``; only the main process writes."""

    def __init__(self, accelerator: Accelerator, run_dir: str | Path, name: str, total: int, start: int = 0,
                 desc: str | None = None, config: dict | None = None, progress: bool = True) -> None:
        self.acc = accelerator
        self.dir = Path(run_dir)
        self.name = name
        self.main = accelerator.is_main_process
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
        # tensorboard hparams only accept flat scalars
        flat = {k: v for k, v in (config or {}).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(name, config=flat)
        self.path = self.dir / "metrics.jsonl"
        self.bar = tqdm(total=total, initial=start, desc=desc or name, disable=not (self.main and progress),
                        dynamic_ncols=True, smoothing=0.05)
        self._t0 = time.time()
        self.step = start

    def scalars(self, step: int, values: dict[str, float], show: bool = True) -> None:
        values = {k: float(v) for k, v in values.items()}
        self.acc.log(values, step=step)
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, "time": round(time.time() - self._t0, 2), **values}) + "\n")
            if show:
                self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in list(values.items())[:4]}, refresh=False)

    def image(self, step: int, tag: str, grid: np.ndarray) -> None:
        """Log a uint8 (H, W, 3) grid to TensorBoard."""
        if not self.main:
            return
        try:
            tracker = self.acc.get_tracker("tensorboard", unwrap=True)
            tracker.add_image(tag, grid, step, dataformats="HWC")
        except Exception:  # no tensorboard tracker configured
            pass

    def advance(self, n: int = 1) -> None:
        """Count ``n`` finished steps (the fault-injection point ``<name>:<step>``, see :mod:`sd35flash.faults`)."""
        self.bar.update(n)
        self.step += n
        fault_point(self.name, self.step)

    def write(self, msg: str) -> None:
        if self.main:
            self.bar.write(msg)

    def close(self, end_training: bool = True) -> None:
        """Close the bar and, unless ``end_training=False``, the trackers (accelerate's
        ``end_training`` also tears down the process group, so callers that still synchronise
        afterwards pass ``False`` and call ``accelerator.end_training()`` themselves)."""
        self.bar.close()
        if end_training:
            self.acc.end_training()
            return
        if self.main:  # finish this run's trackers so a later stage's logger starts clean
            for tracker in self.acc.trackers:
                tracker.finish()
        self.acc.trackers = []


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
