"""Models shipped inside the package, and the one place where a model name becomes a folder.

Shipped models live under ``sd35flash/assets/`` (installed as package data), one versioned folder
each, e.g. ``assets/teachers/shapes-v1/``: a standard ``StableDiffusion3Pipeline`` folder with 16-bit
safetensors, a model card ``README.md`` and ``checksums.sha256`` (coreutils ``sha256sum`` format,
``<hex>  <relative path>`` per line, so ``sha256sum -c checksums.sha256`` checks it too).
``assets/models.json`` is the registry: one entry per shipped model,
``{"name", "path" (relative to assets/), "role", "steps", "guidance", "default", ...}``.

:func:`resolve_model` is what every command runs on ``--model`` / ``--teacher``: an existing path is
returned unchanged; a registered name becomes its folder after the asset is verified (every
checksum, every safetensors file complete); anything else that is not a hub id is a one-line error
listing the valid names. A damaged or missing asset is an error naming the file: nothing is ever
retrained in its place.

A version replaced by a better one (``python -m sd35flash.ship ... --supersede OLD``) leaves the
package: its folder is deleted from the tree and its entry moves to the registry's ``retired`` list
``{"name", "path", "commit", "replaced_by"}``, where ``commit`` still holds its files. Asking for a
retired name is a one-line error that names its successor and how to restore it from git.

``SD35FLASH_ASSETS`` points the registry at another assets folder (tests, or a lead trying a new
asset before it is committed).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sd35flash.checksums import CHECKSUM_FILE, DamagedFileError, check_safetensors, sha256_file, write_checksums
from sd35flash.errors import UserError
from sd35flash.io import atomic_write_text

__all__ = [
    "CHECKSUM_FILE",
    "REGISTRY_FILE",
    "AssetError",
    "RetiredModel",
    "ShippedModel",
    "assets_root",
    "default_teacher",
    "find_shipped",
    "list_models",
    "list_retired",
    "resolve_model",
    "settings_for_folder",
    "verify_asset",
    "write_checksums",
    "write_registry",
]

REGISTRY_FILE = "models.json"
ROLES = ("teacher", "student")


class AssetError(UserError):
    """A shipped model is missing, truncated or does not match its checksums."""


@dataclass
class ShippedModel:
    """One registry entry. ``path`` is relative to the assets folder; ``folder`` is absolute."""

    name: str
    path: str
    role: str
    steps: int
    guidance: float
    default: bool = False
    dtype: str = "float16"
    bytes: int = 0
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    root: Path | None = field(default=None, repr=False, compare=False)

    @property
    def folder(self) -> Path:
        return (self.root or assets_root()) / self.path

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        d["path"] = str(self.folder)
        return d

    def to_entry(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        return d


@dataclass
class RetiredModel:
    """A version taken out of the package for ``replaced_by``; git ``commit`` still holds its folder
    at ``src/sd35flash/assets/<path>``."""

    name: str
    path: str
    commit: str
    replaced_by: str

    def restore_hint(self) -> str:
        rel = f"src/sd35flash/assets/{self.path}"
        return (f"restore it from git history with `git archive {self.commit} {rel} | tar -x -C DIR` and pass "
                f"DIR/{rel}")


def assets_root() -> Path:
    """``$SD35FLASH_ASSETS`` when set, else the package's own ``assets/`` folder."""
    env = os.environ.get("SD35FLASH_ASSETS")
    return Path(env).expanduser() if env else Path(__file__).resolve().parent.parent / "assets"


def _entry(raw: Any, where: Path, root: Path) -> ShippedModel:
    if not isinstance(raw, dict):
        raise AssetError(f"{where}: every entry of 'models' must be an object; the registry is damaged")
    known = {f for f in ShippedModel.__dataclass_fields__ if f != "root"}
    unknown = sorted(set(raw) - known)
    missing = sorted({"name", "path", "role", "steps", "guidance"} - set(raw))
    if unknown or missing:
        raise AssetError(f"{where}: entry {raw.get('name', '?')!r} has unknown keys {unknown} / lacks {missing}; "
                         "the registry is damaged")
    m = ShippedModel(**raw, root=root)
    if m.role not in ROLES or Path(m.path).is_absolute() or ".." in Path(m.path).parts:
        raise AssetError(f"{where}: entry {m.name!r} has role {m.role!r} / path {m.path!r}; the registry is damaged")
    return m


def _read_registry(root: Path) -> dict[str, Any]:
    path = root / REGISTRY_FILE
    if not path.is_file():
        return {"models": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AssetError(f"{path} is unreadable ({exc}); reinstall sd35flash") from exc
    if not isinstance(data, dict) or not isinstance(data.get("models"), list) \
            or not isinstance(data.get("retired", []), list):
        raise AssetError(f"{path} has no 'models' list; reinstall sd35flash")
    return data


def list_models(root: Path | None = None) -> list[ShippedModel]:
    """Every registered model, in registry order (empty when nothing is shipped)."""
    root = root or assets_root()
    return [_entry(m, root / REGISTRY_FILE, root) for m in _read_registry(root)["models"]]


def list_retired(root: Path | None = None) -> list[RetiredModel]:
    """The versions that left the package (registry order)."""
    root = root or assets_root()
    out = []
    for raw in _read_registry(root).get("retired", []):
        try:
            out.append(RetiredModel(**raw))
        except TypeError:
            raise AssetError(f"{root / REGISTRY_FILE}: retired entry {raw!r} is malformed; the registry is "
                             "damaged") from None
    return out


def write_registry(root: Path, models: list[ShippedModel], retired: list[RetiredModel] | None = None) -> None:
    """Write ``models.json`` atomically (the ``retired`` list is kept unless given)."""
    retired = list_retired(root) if retired is None else retired
    data: dict[str, Any] = {"models": [m.to_entry() for m in models]}
    if retired:
        data["retired"] = [asdict(r) for r in retired]
    atomic_write_text(root / REGISTRY_FILE, json.dumps(data, indent=1) + "\n")


def find_shipped(name: str, root: Path | None = None) -> ShippedModel | None:
    return next((m for m in list_models(root) if m.name == name), None)


def verify_asset(model: ShippedModel) -> Path:
    """Check a shipped model's folder against its ``checksums.sha256``; return the folder.

    Every listed file must exist with its recorded SHA-256, and every safetensors file must be
    complete. The first failure is an :class:`AssetError` naming the file."""
    folder = model.folder
    fix = "reinstall sd35flash (or restore the file from git); it is never retrained silently"
    sums_path = folder / CHECKSUM_FILE
    if not folder.is_dir():
        raise AssetError(f"shipped model {model.name!r}: folder {folder} is missing; {fix}")
    if not sums_path.is_file():
        raise AssetError(f"shipped model {model.name!r}: {sums_path} is missing; {fix}")
    for n, line in enumerate(sums_path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel or ".." in Path(rel).parts or Path(rel).is_absolute():
            raise AssetError(f"shipped model {model.name!r}: {sums_path} line {n} is damaged; {fix}")
        path = folder / rel
        if not path.is_file():
            raise AssetError(f"shipped model {model.name!r}: {path} is missing; {fix}")
        if path.suffix == ".safetensors":
            try:
                check_safetensors(path)
            except DamagedFileError as exc:
                raise AssetError(f"shipped model {model.name!r}: {exc}; {fix}") from None
        if sha256_file(path) != digest.lower():
            raise AssetError(f"shipped model {model.name!r}: {path} does not match its checksum in "
                             f"{CHECKSUM_FILE}; {fix}")
    return folder


def _valid_names(models: list[ShippedModel]) -> str:
    return ", ".join(m.name for m in models) if models else "none (no model is shipped in this install)"


def resolve_model(model: str | os.PathLike[str] | None) -> str | None:
    """A ``--model`` / ``--teacher`` value as a loadable location.

    A path (anything with a ``/``, or starting with ``.`` or ``~``, or existing on disk) and a hub id
    (``owner/name``) are returned unchanged: loading them reports their own errors. A bare word is a
    shipped name: it becomes that model's verified folder, or a one-line error listing the names."""
    if model is None:
        return None
    text = os.fspath(model)
    if Path(text).expanduser().exists() or os.sep in text or "/" in text or text.startswith((".", "~")):
        return text
    models = list_models()
    hit = next((m for m in models if m.name == text), None)
    if hit is not None:
        return str(verify_asset(hit))
    gone = next((r for r in list_retired() if r.name == text), None)
    if gone is not None:
        raise UserError(f"shipped model {text!r} was retired for {gone.replaced_by!r} (use that name); to use "
                        f"{text!r} itself, {gone.restore_hint()}")
    raise UserError(f"model {text!r} is neither an existing folder nor a shipped model; shipped models: "
                    f"{_valid_names(models)} (see `sd35flash models`)")


def default_teacher() -> ShippedModel | None:
    """The shipped teacher marked ``default`` (else the last teacher listed); None when none is shipped."""
    teachers = [m for m in list_models() if m.role == "teacher"]
    if not teachers:
        return None
    return next((m for m in teachers if m.default), teachers[-1])


def settings_for_folder(folder: str | os.PathLike[str]) -> ShippedModel | None:
    """The registry entry whose folder is ``folder`` (its recommended steps and guidance), if any."""
    try:
        target = Path(folder).expanduser().resolve()
        models = list_models()
    except (OSError, UserError):
        return None
    return next((m for m in models if m.folder.resolve() == target), None)
