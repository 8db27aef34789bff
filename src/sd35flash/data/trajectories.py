"""Sharded teacher-trajectory files: what ``sd35flash prepare --trajectories`` writes and
distillation's trajectory guidance reads, instead of one fp32 ``.pt`` bank every rank loads whole.

A folder holds::

    index.json                             format, settings, schedule, shard names, num_trajectories
    traj-00000-of-00004.safetensors        states (N, K + 1, C, H, W) in 16 bit (or fp32); metadata:
                                           settings hash, shard, first trajectory, the N prompts (JSON)

``states[m, k]`` is trajectory ``m``'s teacher state at student time ``schedule[k]`` (the last at
``t = 0``: the teacher's sample), as in ``distill.trajectory.TrajectoryBank``. Shard ``s`` holds
trajectories ``[s S, (s + 1) S)``; shard ``s`` is built by rank ``s mod W``, written atomically, and
skipped on resume when its metadata matches the settings. ``index.json`` comes last.
:class:`TrajectoryStore` reads lazily (``rows``) or whole (``states``), and has the bank's
``prompts`` / ``states`` / ``schedule`` / ``samples``, so it stands in for a ``TrajectoryBank``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..config import fingerprint as settings_hash
from ..errors import UserError
from ..flow import Schedule
from ..text.store import save_safetensors_atomic

__all__ = ["TRAJECTORY_INDEX", "TrajectoryStore", "shard_name", "write_trajectory_index",
           "write_trajectory_shards"]

TRAJECTORY_STORE_FORMAT = 1
TRAJECTORY_INDEX = "index.json"
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def shard_name(shard: int, num_shards: int) -> str:
    return f"traj-{shard:05d}-of-{num_shards:05d}.safetensors"


def _num_shards(n: int, shard_size: int) -> int:
    return -(-n // shard_size)


def _finished(path: Path, key: str, rows: int) -> bool:
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("settings") == key and f.get_slice("states").get_shape()[0] == rows
    except Exception:  # truncated or foreign: rebuild
        return False


def write_trajectory_shards(build: Callable[[int, list[str]], torch.Tensor], prompts: Sequence[str],
                            folder: str | Path, settings: dict, shard_size: int, dtype: torch.dtype = torch.bfloat16,
                            batch_size: int = 32, rank: int = 0, world_size: int = 1,
                            progress: Callable[[int], None] | None = None) -> list[int]:
    """Write this rank's unfinished shards; returns the shard numbers written.

    ``build(first, prompts)`` returns the states (B, K + 1, C, H, W) of trajectories
    ``first .. first + B - 1`` (their noise depends on the trajectory number alone, so the result
    does not depend on how trajectories are split into shards, batches or ranks).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = settings_hash(settings, length=24)
    n = len(prompts)
    shards = _num_shards(n, shard_size)
    written = []
    for s in range(rank, shards, world_size):
        path = folder / shard_name(s, shards)
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        for stale in folder.glob(f".{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        if _finished(path, key, hi - lo):
            if progress is not None:
                progress(hi - lo)
            continue
        parts = []
        for start in range(lo, hi, batch_size):
            chunk = list(prompts[start : min(hi, start + batch_size)])
            parts.append(build(start, chunk).to(device="cpu", dtype=dtype))
            if progress is not None:
                progress(len(chunk))
        meta = {"settings": key, "shard": str(s), "first": str(lo), "dtype": _DTYPE_NAMES[dtype],
                "prompts": json.dumps(list(prompts[lo:hi]), ensure_ascii=False)}
        save_safetensors_atomic({"states": torch.cat(parts).contiguous()}, path, meta)
        written.append(s)
    return written


def write_trajectory_index(folder: str | Path, prompts: Sequence[str], settings: dict, schedule: Schedule,
                           shard_size: int, dtype: torch.dtype) -> Path:
    """``index.json``, once every shard is finished (a missing one is a RuntimeError)."""
    from ..io import atomic_write_text

    folder = Path(folder)
    key = settings_hash(settings, length=24)
    n = len(prompts)
    shards = _num_shards(n, shard_size)
    missing = [shard_name(s, shards) for s in range(shards)
               if not _finished(folder / shard_name(s, shards), key, min(n, (s + 1) * shard_size) - s * shard_size)]
    if missing:
        raise RuntimeError(f"{len(missing)} trajectory shard(s) of {folder} are not written yet, e.g. {missing[0]}")
    index = {"format": TRAJECTORY_STORE_FORMAT, "settings": settings, "settings_key": key,
             "schedule": [float(t) for t in schedule], "dtype": _DTYPE_NAMES[dtype], "shard_size": shard_size,
             "num_trajectories": n, "shards": [shard_name(s, shards) for s in range(shards)],
             "prompts": list(prompts)}
    return atomic_write_text(folder / TRAJECTORY_INDEX, json.dumps(index, ensure_ascii=False))


class TrajectoryStore:
    """Read a trajectory folder: ``rows(idx)`` loads only the shards those trajectories live in.

    ``states`` / ``samples`` load every shard (as float32), for code that wants a whole bank."""

    def __init__(self, folder: str | Path, settings: dict | None = None) -> None:
        self.folder = Path(folder).expanduser()
        path = self.folder / TRAJECTORY_INDEX
        if not path.is_file():
            raise UserError(f"{self.folder} holds no finished teacher trajectories (no {TRAJECTORY_INDEX}); run "
                            "`sd35flash prepare --trajectories` (with --resume to finish an interrupted one)")
        index = json.loads(path.read_text(encoding="utf-8"))
        if index.get("format") != TRAJECTORY_STORE_FORMAT:
            raise UserError(f"{self.folder} holds trajectories of format {index.get('format')}; run "
                            "`sd35flash prepare --trajectories` again")
        if settings is not None and settings_hash(settings, length=24) != index["settings_key"]:
            diff = sorted(k for k in set(settings) | set(index["settings"])
                          if settings.get(k) != index["settings"].get(k))
            raise UserError(f"the teacher trajectories in {self.folder} were built with other settings "
                            f"({', '.join(diff)}); run `sd35flash prepare --trajectories` with this recipe")
        self.index = index
        self.prompts: list[str] = list(index["prompts"])
        self.schedule = Schedule.of(index["schedule"])
        self.shard_size: int = int(index["shard_size"])
        self._handles: dict[int, object] = {}
        self._all: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def _shard(self, s: int):
        if s not in self._handles:
            from safetensors import safe_open

            self._handles[s] = safe_open(str(self.folder / self.index["shards"][s]), "pt")
        return self._handles[s]

    def rows(self, idx: Sequence[int] | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """States (B, K + 1, C, H, W) of trajectories ``idx``, read from their shards only."""
        out = []
        for m in (idx.tolist() if isinstance(idx, torch.Tensor) else idx):
            s, r = divmod(int(m), self.shard_size)
            out.append(self._shard(s).get_slice("states")[r : r + 1])
        return torch.cat(out).to(dtype)

    @property
    def states(self) -> torch.Tensor:
        if self._all is None:
            shards = range(len(self.index["shards"]))
            self._all = torch.cat([self._shard(s).get_tensor("states") for s in shards]).float()
        return self._all

    @property
    def samples(self) -> torch.Tensor:
        """The teacher's end points (its many-step CFG samples)."""
        return self.states[:, -1]
