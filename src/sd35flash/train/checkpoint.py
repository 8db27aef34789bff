"""Atomic, verified checkpoints with exact resume, on top of ``Accelerator.save_state``.

A checkpoint is a folder ``ckpt-<step>`` holding every prepared model and optimiser, the LR
scheduler, every process's RNG states and each object registered with
``accelerator.register_for_checkpointing`` (EMA, data position, collapse detectors). It is written
to ``ckpt-<step>.tmp``; ``meta.json`` (step, what the trainer added, whether the checkpoint is
*good*) and then ``manifest.json`` (every file's size and SHA-256) are written last, and the folder
is renamed only when complete, so a crash never leaves a half checkpoint that a resume would pick up.

A run whose models are sharded (FSDP2, :mod:`.sharding`) also writes ``sharded/``: the models and
optimisers through ``torch.distributed.checkpoint`` (one ``.distcp`` file per process) and each
process's EMA of its shards; accelerate's part then holds the rest (schedules, samplers, alarms,
every process's RNG). The manifest, the fall-back to an older checkpoint and the retention below
cover it like any other file (the processes must share the checkpoint folder's file system).

Loading verifies the manifest. When the newest checkpoint is damaged (a file missing, truncated or
changed, an RNG state that cannot be read), the previous valid one is used with a one-line warning
naming both; with none left, a one-line error. A checkpoint written without a manifest (by older
versions) is loaded after cheaper structural checks, with a note.

A checkpoint is *good* when every floating-point weight it holds (the models and the EMA) is finite
and below ``max_abs`` in magnitude, and every registered :class:`~.alarms.CollapseDetector` was
healthy when it was saved. The newest good checkpoint is never deleted by the retention policy
(the ``keep`` newest are kept besides it), and a training alarm names it (:meth:`CheckpointManager.alarm`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import Accelerator

from ..checksums import check_safetensors, folder_files, sha256_file
from ..errors import TrainingAlarm, UserError
from ..faults import fault_point
from .alarms import CollapseDetector
from .runtime import world_info
from .sharding import SHARDED_DIR

PREFIX = "ckpt-"
META = "meta.json"
MANIFEST = "manifest.json"
DIVERGED = ".diverged"
_NAME = re.compile(rf"{PREFIX}(\d+)")


def read_meta(path: str | Path) -> dict:
    """The ``meta.json`` of checkpoint ``path`` (its step and whatever the trainer added)."""
    return json.loads((Path(path) / META).read_text())


def saved_models(path: str | Path) -> int:
    """How many prepared models ``Accelerator.save_state`` wrote into checkpoint ``path``."""
    pattern = re.compile(r"(model|pytorch_model)(_\d+)?\.(safetensors|bin)")
    return sum(1 for p in Path(path).iterdir() if pattern.fullmatch(p.name))


def warn(msg: str) -> None:
    """One line on stderr."""
    print(f"sd35flash: warning: {msg}", file=sys.stderr, flush=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: str | Path) -> Path:
    """Write ``folder/manifest.json``: ``{"files": {relative path: {"size", "sha256"}}}`` for every
    file in the folder. Each file is flushed to disk first; the manifest is written atomically."""
    root = Path(folder)
    files = {}
    for rel in folder_files(root, skip=[MANIFEST]):
        _fsync(root / rel)
        files[rel] = {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
    tmp = root / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    return root / MANIFEST


def checkpoint_problem(folder: str | Path) -> str | None:
    """What is wrong with checkpoint ``folder`` (``None``: nothing).

    With a manifest: every listed file must exist with the recorded size and SHA-256. Without one
    (an older checkpoint): ``meta.json`` must parse, safetensors files must be complete and every
    ``torch.save`` file (optimiser, scheduler, custom objects, RNG states) must be a complete zip
    archive."""
    root = Path(folder)
    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError) as exc:
            return f"{MANIFEST} is unreadable ({type(exc).__name__})"
        for rel, rec in files.items():
            p = root / rel
            if not p.is_file():
                return f"{rel} is missing"
            if p.stat().st_size != rec["size"]:
                return f"{rel} has {p.stat().st_size} bytes, the manifest says {rec['size']}"
            if sha256_file(p) != rec["sha256"]:
                return f"{rel} does not match its SHA-256 in the manifest"
        return None
    try:
        meta = json.loads((root / META).read_text())
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{META} is missing or unreadable"
    for p in sorted(root.iterdir()):
        if p.suffix == ".safetensors":
            try:
                check_safetensors(p, p.name)
            except UserError:
                return f"{p.name} is truncated or unreadable"
        elif p.suffix in (".bin", ".pkl"):
            try:
                with zipfile.ZipFile(p) as z:
                    z.namelist()
            except (zipfile.BadZipFile, OSError):
                return f"{p.name} is truncated or unreadable"
    if not any(root.glob("random_states_*.pkl")):
        return "it holds no RNG state (random_states_*.pkl)"
    return None


def weights_health(folder: str | Path, max_abs: float) -> tuple[bool, float]:
    """(every floating weight in the checkpoint's models and registered objects is finite and below
    ``max_abs``, the largest magnitude seen). Optimiser states are not weights and are not read."""
    from safetensors import safe_open

    def tensors():
        for p in sorted(root.glob("*.safetensors")):
            with safe_open(str(p), "pt") as f:  # one tensor at a time
                for k in f.keys():
                    yield f.get_tensor(k)
        for p in sorted([*root.glob("custom_checkpoint_*.pkl"), *root.glob("sharded/ema-rank*.pt")]):
            try:
                state = torch.load(p, weights_only=True, map_location="cpu", mmap=True)
            except Exception:  # an object whose state is not plain tensors/containers holds no weights
                continue
            stack = [state]
            while stack:
                x = stack.pop()
                if isinstance(x, torch.Tensor):
                    yield x
                elif isinstance(x, dict):
                    stack += list(x.values())
                elif isinstance(x, (list, tuple)):
                    stack += list(x)

    root = Path(folder)
    peak = 0.0
    for t in tensors():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if not torch.isfinite(t).all():
            return False, math.inf
        peak = max(peak, float(t.abs().max()))
    return peak < max_abs, peak


class CheckpointManager:
    """Saves, verifies, finds and loads checkpoints in ``root``; keeps the ``keep`` newest, the
    newest good one (``keep`` is at least 2, so a damaged newest checkpoint has one to fall back to)
    and those at the ``milestones`` steps (always saved there, never pruned: a stage's end that
    another run starts from)."""

    def __init__(self, root: str | Path, keep: int = 2, max_abs: float = 1e4, sharded=None,
                 milestones: Iterable[int] = ()) -> None:
        """``sharded``: the :class:`~.sharding.ShardedState` of a sharded run (``None``: everything is
        accelerate's)."""
        self.root = Path(root)
        self.sharded = sharded
        self.milestones = frozenset(int(m) for m in milestones)
        self.keep = max(2, keep)
        self.max_abs = max_abs
        self._problems: dict[Path, str | None] = {}
        self._chosen: Path | None = None

    @staticmethod
    def step_of(path: Path) -> int:
        return int(_NAME.fullmatch(path.name).group(1))

    def all(self) -> list[Path]:
        """Every completed checkpoint folder (damaged or not), oldest first."""
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
        return sorted(done, key=self.step_of)

    def problem(self, path: Path) -> str | None:
        """:func:`checkpoint_problem`, computed once per folder."""
        if path not in self._problems:
            self._problems[path] = checkpoint_problem(path)
        return self._problems[path]

    def latest(self, quiet: bool | None = None) -> Path | None:
        """The newest valid checkpoint (``None`` when there is no checkpoint at all).

        Damaged newer checkpoints are skipped with a one-line warning naming them and the one used
        (printed by the rank-0 process unless ``quiet``); when every checkpoint is damaged, a
        one-line :class:`UserError`."""
        if quiet is None:
            quiet = world_info()[0] != 0
        ckpts = self.all()
        if not ckpts:
            return None
        for path in reversed(ckpts):
            if self.problem(path) is None:
                break
        else:
            newest = ckpts[-1]
            raise UserError(f"no usable checkpoint in {self.root}: the newest, {newest.name}, is damaged "
                            f"({self.problem(newest)}) and so "
                            f"{'is every older one' if len(ckpts) > 1 else 'there is no older one'}; "
                            f"delete {self.root} to start over")
        if path != self._chosen and not quiet:
            self._chosen = path
            if path != ckpts[-1]:
                newest = ckpts[-1]
                warn(f"checkpoint {newest} is damaged ({self.problem(newest)}); falling back to the previous valid "
                     f"checkpoint {path.name}")
            if not (path / MANIFEST).is_file():
                warn(f"checkpoint {path} has no {MANIFEST} (written by an older sd35flash); loading it after "
                     "structural checks only")
        return path

    def at_step(self, step: int) -> Path | None:
        """The valid checkpoint saved after global step ``step``, if any is left."""
        for path in self.all():
            if self.step_of(path) == step and self.problem(path) is None:
                return path
        return None

    def last_good(self) -> Path | None:
        """The newest valid checkpoint whose weights were finite and bounded and whose probes were
        healthy when it was saved (a checkpoint without that record counts as good)."""
        for path in reversed(self.all()):
            if self.problem(path) is None and read_meta(path).get("good", True):
                return path
        return None

    def save(self, accelerator: Accelerator, step: int, meta: dict | None = None) -> Path:
        """Write ``ckpt-<step>`` atomically on every process's behalf (the main process writes the
        meta and the manifest, then renames). Its ``good`` flag combines :func:`weights_health` with
        the state of every registered :class:`CollapseDetector`."""
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f"{PREFIX}{step:08d}.tmp"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{PREFIX}*.tmp"):  # left by a process killed while saving
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if self.sharded is not None:
            self.sharded.save(tmp / SHARDED_DIR)
        accelerator.wait_for_everyone()
        fault_point("checkpoint", step)
        if accelerator.is_main_process:
            finite, peak = weights_health(tmp, self.max_abs)
            detectors = [o for o in accelerator._custom_objects if isinstance(o, CollapseDetector)]
            healthy = all(d.healthy for d in detectors)
            record = {"step": step, **(meta or {}), "good": bool(finite and healthy),
                      "weights_max_abs": peak if math.isfinite(peak) else None, "probes_healthy": healthy}
            (tmp / META).write_text(json.dumps(record, indent=1))
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._problems[final] = None  # just written and hashed
            self._retain()
        accelerator.wait_for_everyone()
        return final

    def _retain(self) -> None:
        ckpts = self.all()
        keep = set(ckpts[-self.keep:]) | {p for p in ckpts if self.step_of(p) in self.milestones}
        good = self.last_good()
        if good is not None:
            keep.add(good)
        for old in ckpts:
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)
                self._problems.pop(old, None)

    def load(self, accelerator: Accelerator, path: Path | None = None) -> int:
        """Restore the state saved at ``path`` (default: the newest valid one, see :meth:`latest`)
        and return its step (0 if none). An RNG state this process cannot restore is a warning that
        the resume is not bit-exact (accelerate itself skips it silently)."""
        path = path or self.latest(quiet=not accelerator.is_main_process)
        if path is None:
            return 0
        problem = self.problem(path)
        if problem is not None:
            raise UserError(f"checkpoint {path} is damaged ({problem}); pick another or delete it")
        rng = path / f"random_states_{accelerator.process_index}.pkl"
        reason = None
        if not rng.is_file():
            reason = f"it holds no RNG state for process {accelerator.process_index}"
        else:
            try:
                states = torch.load(rng, weights_only=False)
                needed = ["random_state", "numpy_random_seed", "torch_manual_seed"]
                if torch.cuda.is_available():
                    needed.append("torch_cuda_manual_seed")
                missing = [k for k in needed if k not in states]
                if missing:
                    reason = f"its RNG state lacks {', '.join(missing)} (saved on another kind of device?)"
            except Exception as exc:
                reason = f"its RNG state cannot be read ({type(exc).__name__})"
        if reason is not None:
            warn(f"checkpoint {path.name}: {reason}; training continues with fresh random numbers, so this resume "
                 "is not bit-exact")
        accelerator.load_state(str(path))
        if self.sharded is not None:
            if not (path / SHARDED_DIR).is_dir():
                raise UserError(f"checkpoint {path} holds no sharded models; it was written without --sharding fsdp: "
                                "resume it with the sharding that wrote it")
            self.sharded.load(path / SHARDED_DIR)
        return int(read_meta(path)["step"])

    def alarm(self, exc: BaseException, main: bool = True) -> TrainingAlarm:
        """The :class:`TrainingAlarm` to raise for ``exc`` (an alarm, or non-finite samples): its
        message plus the last good checkpoint. The main process renames checkpoints newer than that
        one to ``ckpt-<step>.diverged`` (kept for inspection, never resumed from)."""
        good = self.last_good()
        for path in self.all():
            if main and (good is None or self.step_of(path) > self.step_of(good)):
                dest, n = path.with_name(path.name + DIVERGED), 1
                while dest.exists():
                    dest, n = path.with_name(f"{path.name}{DIVERGED}{n}"), n + 1
                path.rename(dest)
                self._problems.pop(path, None)
        text = str(exc) if isinstance(exc, TrainingAlarm) else f"training stopped: {exc}"
        if good is None:
            note = "no good checkpoint was saved before it; lower the learning rate and start again"
        else:
            note = (f"the last good checkpoint is {good} (step {self.step_of(good)}); --resume continues from it, or "
                    "lower the learning rate")
        return TrainingAlarm(f"{text}; {note}")
