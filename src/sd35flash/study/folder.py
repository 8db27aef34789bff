"""The study folder: what ``study create`` writes and ``study serve`` / ``results`` read.

Layout::

    DIR/plan.json        what is being generated (models, prompts, seeds, image-name salt); resume key
    DIR/timing.json      measured seconds per image, per model
    DIR/images/*.png     every image, under an opaque name that does not reveal the model
    DIR/manifest.json    the finished study: models, prompts, pairs (written last, atomically)
    DIR/votes.sqlite3    the votes (``study serve``), SQLite in WAL mode
    DIR/invite_code      annotators' invite code (mode 0600)
    DIR/admin_token      the admin page's bearer token (mode 0600)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

from ..errors import UserError

MANIFEST = "manifest.json"
PLAN = "plan.json"
TIMING = "timing.json"
IMAGES = "images"
DATABASE = "votes.sqlite3"
INVITE_FILE = "invite_code"
TOKEN_FILE = "admin_token"
FORMAT_VERSION = 1

_IMAGE_NAME = re.compile(r"^[0-9a-f]{24}\.png$")


def image_name(salt: str, *parts: object) -> str:
    """An opaque, stable file name for one image: ``HMAC-SHA256(salt, "|".join(parts))[:24].png``.

    Without the salt (kept in ``plan.json``, never served) the name reveals nothing about the model."""
    msg = "|".join(str(p) for p in parts).encode()
    return hmac.new(salt.encode(), msg, hashlib.sha256).hexdigest()[:24] + ".png"


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path} ({exc}); {what}") from None


class StudyFolder:
    """Paths of one study folder, and the rules that keep served files inside it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def images(self) -> Path:
        return self.root / IMAGES

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def database(self) -> Path:
        return self.root / DATABASE

    def require(self) -> StudyFolder:
        """Raise :class:`UserError` unless this is a finished study folder."""
        if not self.root.is_dir():
            raise UserError(f"study folder {self.root} does not exist; make one with `sd35flash study create`")
        if not self.manifest_path.is_file():
            raise UserError(f"{self.root} holds no {MANIFEST}; finish it with `sd35flash study create` "
                            "(the same command resumes)")
        return self

    def manifest(self) -> dict[str, Any]:
        data = read_json(self.require().manifest_path, "re-create it with `sd35flash study create`")
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION or "pairs" not in data:
            raise UserError(f"{self.manifest_path} is not a format-{FORMAT_VERSION} study manifest; "
                            "re-create it with `sd35flash study create`")
        return data

    def image_file(self, name: str) -> Path | None:
        """The file an image URL names, or ``None`` unless it is a study image inside ``images/``.

        Only opaque names (24 hex digits + ``.png``) are accepted, and the resolved path must still
        lie inside ``images/``, so ``..``, absolute paths, links out of the folder and other files of
        the study (manifest, database, secrets) are never served."""
        if not _IMAGE_NAME.match(name):
            return None
        base = self.images.resolve()
        path = (base / name).resolve()
        if path.parent != base or not path.is_file():
            return None
        return path

    def secret(self, filename: str, nbytes: int) -> Path:
        """``DIR/filename`` holding a random token, created with mode 0600 when missing.

        An existing file is reused (restarting the server keeps the invite code); one that cannot be
        read, or is empty, is a :class:`UserError`."""
        path = self.root / filename
        if not path.exists():
            token = secrets.token_urlsafe(nbytes)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another process made it first: read theirs
            except OSError as exc:
                raise UserError(f"cannot create {path} ({exc.strerror}); check the folder's permissions") from None
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(token + "\n")
        return path

    def read_secret(self, filename: str) -> str:
        path = self.root / filename
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not text"
            raise UserError(f"cannot read {path} ({reason}); fix its permissions or delete it to make a new one") \
                from None
        if not text or len(text) > 200 or any(c.isspace() for c in text):
            raise UserError(f"{path} does not hold one token; delete it to make a new one")
        return text

    def invite_code(self) -> str:
        self.secret(INVITE_FILE, 9)
        return self.read_secret(INVITE_FILE)

    def admin_token(self) -> str:
        self.secret(TOKEN_FILE, 24)
        return self.read_secret(TOKEN_FILE)
