"""File checksums: SHA-256 of every file a folder holds, and a structural check of safetensors files.

Every model folder sd35flash writes (pipeline, student and quantized folders) carries
``checksums.sha256`` in the format of coreutils' ``sha256sum`` (``<hex>  <relative path>`` per
line), so ``sha256sum -c checksums.sha256`` run inside the folder checks it too. Loading through
sd35flash verifies it: a missing, truncated or changed file is a one-line
:class:`~sd35flash.errors.UserError` naming the file. A folder without the file (a hub download, a
folder written by stock diffusers) is not hashed, but its safetensors files still get the cheap
:func:`check_safetensors` size check, which catches truncation.

Files are hashed in 1 MiB chunks, so memory stays flat for multi-GB weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from .errors import UserError
from .io import atomic_write_text

CHECKSUM_FILE = "checksums.sha256"
CHUNK = 1 << 20


class DamagedFileError(UserError):
    """A file does not match its recorded checksum or size, or a safetensors file is truncated."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of ``path``, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_files(folder: str | Path, skip: Iterable[str] = ()) -> list[str]:
    """Every regular file below ``folder`` as a sorted POSIX relative path, leaving out ``skip``."""
    root = Path(folder)
    skipped = set(skip)
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in skipped and (Path(dirpath) / name).is_file():
                out.append(rel)
    return sorted(out)


def write_checksums(folder: str | Path) -> Path:
    """Hash every file below ``folder`` into ``folder/checksums.sha256`` (written atomically, last)."""
    root = Path(folder)
    lines = [f"{sha256_file(root / rel)}  {rel}\n" for rel in folder_files(root, skip=[CHECKSUM_FILE])]
    path = root / CHECKSUM_FILE
    atomic_write_text(path, "".join(lines), path.name)
    return path


def update_checksum(folder: str | Path, rel: str) -> None:
    """Re-hash one file ``rel`` of ``folder`` into its ``checksums.sha256`` (no-op without that file):
    for sd35flash's own edits of a saved folder, which must not read as damage."""
    root = Path(folder)
    sums = read_checksums(root)
    if sums is None:
        return
    sums[rel] = sha256_file(root / rel)
    atomic_write_text(root / CHECKSUM_FILE, "".join(f"{h}  {r}\n" for r, h in sorted(sums.items())), CHECKSUM_FILE)


def read_checksums(folder: str | Path) -> dict[str, str] | None:
    """``{relative path: hex sha256}`` from ``folder/checksums.sha256``; ``None`` when there is none."""
    path = Path(folder) / CHECKSUM_FILE
    if not path.is_file():
        return None
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel:
            raise DamagedFileError(f"{path} line {n} is not '<sha256>  <file>'; the folder's checksum file is damaged")
        out[rel.lstrip("*")] = digest.lower()
    return out


def verify_checksums(folder: str | Path, name: str | None = None) -> bool:
    """Check every file listed in ``folder/checksums.sha256``. Returns False when the folder has no
    checksum file; raises :class:`DamagedFileError` naming the first missing or changed file."""
    root = Path(folder)
    sums = read_checksums(root)
    if sums is None:
        return False
    label = name or str(root)
    for rel, digest in sums.items():
        path = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise DamagedFileError(f"{label}: {CHECKSUM_FILE} names {rel!r}, outside the folder; the file is damaged")
        if not path.is_file():
            raise DamagedFileError(f"{label}: {rel} is missing (listed in {CHECKSUM_FILE}); re-create or re-download "
                                   "the model")
        if sha256_file(path) != digest:
            raise DamagedFileError(f"{label}: {rel} is damaged (SHA-256 differs from {CHECKSUM_FILE}); re-create or "
                                   "re-download the model")
    return True


def check_safetensors(path: str | Path, label: str | None = None) -> None:
    """Raise :class:`DamagedFileError` unless ``path`` is a complete safetensors file: an 8-byte
    little-endian header length ``n``, an ``n``-byte JSON header, then exactly as many data bytes as
    the largest ``data_offsets`` end. Reads only the header."""
    p = Path(path)
    where = label or str(p)
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError("header runs past the end of the file")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise DamagedFileError(f"{where} is not a readable safetensors file ({exc}); "
                               "re-create or re-download it") from exc
    if 8 + n + end != size:
        raise DamagedFileError(f"{where} is truncated or padded ({size} bytes, its header says {8 + n + end}); "
                               "re-create or re-download it")


def verify_folder(folder: str | Path, name: str | None = None) -> bool:
    """Checksums when ``folder`` has them, then the size check of every ``*.safetensors`` file below
    it. Returns whether checksums were verified."""
    root = Path(folder)
    verified = verify_checksums(root, name)
    if not verified:
        for rel in folder_files(root):
            if rel.endswith(".safetensors"):
                check_safetensors(root / rel, f"{name or root}: {rel}")
    return verified
