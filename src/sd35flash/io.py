"""Safe output and input: atomic file writes, atomic folder swaps, output pre-flight checks and
one-line errors for unreadable inputs.

Every file sd35flash writes goes through :func:`atomic_write` (a temporary sibling
``.<name>.tmp-<pid>-<id>``, flushed, then ``os.replace``), and every folder through
:func:`staged_dir` (a temporary sibling folder that replaces the target only when complete). The
temporary names carry the writer's process id, so :func:`clean_stale` can remove the leftovers of a
killed run without touching a live writer's. Output paths are checked with
:func:`check_writable_output` before any work starts; none of these checks create anything.
Any :class:`OSError` while writing becomes a one-line :class:`~sd35flash.errors.UserError`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from .errors import UserError

MODEL_INDEX = "model_index.json"


def _token() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _nearest_existing(p: Path) -> Path:
    q = p
    while not q.exists() and q != q.parent:
        q = q.parent
    return q


def check_writable_output(path: str | os.PathLike[str], kind: Literal["file", "dir"] = "file",
                          what: str = "--out") -> Path:
    """Fail early, with one line, when ``path`` cannot be written as a ``kind``; creates nothing.

    A file output must not be an existing folder; a folder output must not be an existing file; the
    nearest existing ancestor must be a folder this process can write into (missing parents are
    created at write time); an existing output must itself be writable."""
    p = Path(path).expanduser()
    if not str(path).strip():
        raise UserError(f"{what} is empty; pass a path")
    if kind == "file" and (p.is_dir() or str(path).endswith(os.sep)):
        raise UserError(f"{what} {p} is a folder; pass a file path")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise UserError(f"{what} {p} is a file; pass a folder path")
    base = _nearest_existing(p.absolute().parent)
    if not base.is_dir():
        raise UserError(f"{what} {p}: {base} is a file, not a folder; pass a path under a folder")
    if _on_pseudo_fs(base):
        raise UserError(f"{what} {p} is on a system file system ({base}); pass a path on a disk")
    for d in (base, p) if p.is_dir() else (base,):
        _probe(d, what, p)
    return p


def _probe(folder: Path, what: str, p: Path) -> None:
    """Create and delete a probe file in ``folder`` (``os.access`` is not enough: root, read-only mounts)."""
    probe = folder / f".sd35flash-probe-{_token()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
    except OSError as e:
        raise UserError(f"{what} {p} is not writable ({_why(e)} in {folder}); pass a path you can write to") from None
    _unlink(probe)


def _on_pseudo_fs(p: Path) -> bool:
    """True for ``/proc`` and ``/sys`` paths."""
    parts = p.absolute().parts
    return len(parts) > 1 and parts[1] in ("proc", "sys")


def is_model_folder(p: Path, marker: str = MODEL_INDEX) -> bool:
    return (p / marker).is_file()


def check_model_output(path: str | os.PathLike[str], what: str = "--out", marker: str = MODEL_INDEX,
                       kind: str = "model") -> Path:
    """:func:`check_writable_output` for a folder that will be replaced by a new model: an existing
    folder is only replaced when it holds ``marker`` (a model we wrote) or nothing, so a user's
    other files are never deleted."""
    p = check_writable_output(path, "dir", what)
    if p.is_dir() and any(p.iterdir()) and not is_model_folder(p, marker):
        raise UserError(f"{what} {p} exists and is not a {kind} folder (no {marker}); choose a new folder "
                        "(nothing was changed)")
    return p


def read_text(path: str | os.PathLike[str], what: str = "file") -> str:
    """A UTF-8 text file, with one-line errors for a missing, unreadable, folder or non-UTF-8 path."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} {p} does not exist")
    if p.is_dir():
        raise UserError(f"{what} {p} is a folder; pass a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {p} ({_why(e)})") from None


# ----------------------------------------------------------------------------- files


def atomic_write(path: str | os.PathLike[str], writer: Callable[[Path], None], what: str = "output") -> Path:
    """Write ``path`` atomically: ``writer(tmp)`` fills a temporary sibling, which then replaces ``path``.

    Missing parent folders are created. On any failure (including Ctrl-C) the temporary file is
    removed and ``path`` is unchanged; an OSError is raised as a one-line UserError."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"cannot write {what} {p}: it is a folder; pass a file path")
    tmp = p.parent / f".{p.name}.tmp-{_token()}"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        writer(tmp)
        with contextlib.suppress(OSError):  # not every file system supports fsync on files opened read-only
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, p)
    except OSError as e:
        _unlink(tmp)
        raise UserError(f"cannot write {what} {p} ({_why(e)}); pass a path you can write to") from None
    except BaseException:
        _unlink(tmp)
        raise
    return p


def _unlink(p: Path) -> None:
    with contextlib.suppress(OSError):
        p.unlink()


def atomic_write_text(path: str | os.PathLike[str], text: str, what: str = "output") -> Path:
    return atomic_write(path, lambda t: t.write_text(text, encoding="utf-8"), what)


def check_finite_tree(obj: Any, where: str = "") -> None:
    """Raise ValueError naming the first NaN or infinite float inside nested dicts / lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite value {obj} at {where or 'top level'}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_finite_tree(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite_tree(v, f"{where}[{i}]")


def to_json(obj: Any, indent: int | None = 1, **kw: Any) -> str:
    """Strict JSON text: a NaN or infinity is an error naming where it is, never a bare ``NaN``."""
    try:
        return json.dumps(obj, indent=indent, allow_nan=False, **kw)
    except ValueError:
        check_finite_tree(obj)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any, what: str = "output", indent: int | None = 1) -> Path:
    """Strict JSON (see :func:`to_json`), written atomically; a non-finite number is a one-line error
    (NaN in a result means the model or the input produced garbage, which must not look like data)."""
    try:
        text = to_json(obj, indent=indent)
    except ValueError as e:
        raise UserError(f"refusing to write {what} {path}: {e} (the model or an input produced NaN/inf)") from None
    return atomic_write_text(path, text + "\n", what)


def atomic_torch_save(path: str | os.PathLike[str], obj: Any, what: str = "output") -> Path:
    import torch

    return atomic_write(path, lambda t: torch.save(obj, t), what)


# ----------------------------------------------------------------------------- folders


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale(target: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` siblings of ``target`` left by a
    process that no longer runs (a kill during a save). Returns what was removed."""
    t = Path(target).expanduser()
    removed: list[Path] = []
    if not t.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for p in t.parent.glob(f".{t.name}.{kind}-*"):
            pid = p.name[len(f".{t.name}.{kind}-"):].split("-")[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                _unlink(p)
            removed.append(p)
    return removed


def replace_dir(tmp: Path, target: Path) -> None:
    """Swap the complete folder ``tmp`` in at ``target``; the previous ``target`` is moved aside
    first and put back if the swap fails, then deleted."""
    old = target.parent / f".{target.name}.old-{_token()}"
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike[str], what: str = "output folder") -> Iterator[Path]:
    """A new temporary sibling folder of ``target``, swapped in when the block completes and removed
    when it fails, so an interrupted write leaves ``target`` as it was and nothing else behind.

    Callers that replace a user-given path check it with :func:`check_model_output` first."""
    t = Path(target).expanduser()
    if t.exists() and not t.is_dir():
        raise UserError(f"cannot write {what} {t}: it is a file; pass a folder path")
    tmp = t.parent / f".{t.name}.tmp-{_token()}"
    try:
        t.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(t)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot write {what} {t} ({_why(e)}); pass a folder you can write to") from None
    try:
        yield tmp
        replace_dir(tmp, t)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {what} {t} ({_why(e)}); pass a folder you can write to") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_dir(src: str | os.PathLike[str], target: str | os.PathLike[str], what: str = "output folder",
             link: bool = False) -> Path:
    """Copy folder ``src`` to ``target`` through :func:`staged_dir` (hard links with ``link=True``
    where the file system allows)."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    t = Path(target).expanduser()
    with staged_dir(t, what) as tmp:
        shutil.copytree(src, tmp, copy_function=link_or_copy if link else shutil.copy2, dirs_exist_ok=True)
    return t
