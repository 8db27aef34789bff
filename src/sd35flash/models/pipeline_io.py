"""Load and save SD3 pipeline folders: the one model format of the project.

A model is named either by a local folder (made by ``sd35flash pretrain`` / ``distill``, or any
``save_pretrained`` of a ``StableDiffusion3Pipeline``) or by a Hugging Face hub id such as
``stabilityai/stable-diffusion-3.5-medium``. Both go through
``StableDiffusion3Pipeline.from_pretrained``; failures the user can fix become one-line
:class:`~sd35flash.errors.UserError` messages.

Saving is atomic: the pipeline (plus any extra files, such as ``sd35flash.json``) is written into a
temporary sibling folder which then replaces the target by two renames, so an interrupted save never
leaves a half-written model folder behind. The last file written is ``checksums.sha256``
(:mod:`sd35flash.checksums`, ``sha256sum -c`` format); loading a local folder verifies it, and a
folder without it (a hub download, a stock ``save_pretrained``) gets a size check of its
safetensors files instead.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline

from sd35flash.checksums import verify_folder, write_checksums
from sd35flash.errors import UserError
from sd35flash.faults import fault_point
from sd35flash.io import check_model_output, staged_dir

__all__ = [
    "MODEL_INDEX",
    "PIPELINE_CLASS",
    "is_local_path",
    "load_pipeline",
    "save_pipeline",
]

MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "StableDiffusion3Pipeline"

# "owner/name" with hub-legal characters; anything else is taken as a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def is_local_path(model: str | os.PathLike[str]) -> bool:
    """True when ``model`` names a local folder rather than a hub id.

    Anything that exists on disk is local. Otherwise only a string of the hub form ``owner/name``
    (one slash, hub-legal characters, not starting with ``.`` or ``~``) is a hub id; every other
    string (``runs/x/teacher``, ``./student``, ``/abs/path``, ``teacher``) is a local path.
    """
    text = os.fspath(model)
    if Path(text).expanduser().exists():
        return True
    return _HUB_ID.match(text) is None


def _dtype_kwarg(torch_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword: ``dtype`` on diffusers that renamed it (0.42+), else ``torch_dtype``."""
    try:
        from diffusers.utils import deprecation_utils

        renamed = hasattr(deprecation_utils, "_resolve_dtype")
    except ImportError:
        renamed = False
    return {"dtype": torch_dtype} if renamed else {"torch_dtype": torch_dtype}


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the hub could not give us this model" (network, auth, bad id)."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        from huggingface_hub import errors as hub_errors

        for name in ("HfHubHTTPError", "HFValidationError", "LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            if hasattr(hub_errors, name):
                errors.append(getattr(hub_errors, name))
    except ImportError:  # pragma: no cover - huggingface_hub always comes with diffusers
        pass
    for module_name in ("httpx", "requests"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        base = getattr(module, "HTTPError", None) or getattr(module, "RequestException", None)
        if isinstance(base, type) and issubclass(base, BaseException):
            errors.append(base)
    return tuple(errors)


def _check_pipeline_folder(folder: Path, name: str) -> None:
    if not folder.exists():
        raise UserError(
            f"model folder {name} does not exist; pass a folder made by `sd35flash pretrain` / `distill`, or a hub id"
        )
    if not folder.is_dir():
        raise UserError(f"{name} is a file, not a model folder; pass a pipeline folder or a hub id")
    index = folder / MODEL_INDEX
    if not index.is_file():
        raise UserError(
            f"{name} is not an SD3 pipeline folder (no {MODEL_INDEX}); pass a folder saved by "
            "`sd35flash pretrain` / `distill` or by StableDiffusion3Pipeline.save_pretrained"
        )
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{name} is not an SD3 pipeline folder ({MODEL_INDEX} is unreadable: {exc})") from exc
    class_name = data.get("_class_name") if isinstance(data, dict) else None
    if class_name != PIPELINE_CLASS:
        raise UserError(
            f"{name} is not an SD3 pipeline folder ({MODEL_INDEX} names {class_name!r}, expected {PIPELINE_CLASS!r})"
        )


def load_pipeline(
    model: str | os.PathLike[str],
    revision: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    verify: bool = True,
    **components: Any,
) -> StableDiffusion3Pipeline:
    """Load a ``StableDiffusion3Pipeline`` from a local folder or a hub id, onto ``device``.

    ``revision`` applies to hub ids only (a branch, tag or commit). A local folder must contain a
    ``model_index.json`` naming ``StableDiffusion3Pipeline``. ``components`` replace parts at load
    time, as in ``from_pretrained`` (``text_encoder_3=None`` never loads T5; a ready module is used
    as given). ``verify=False`` skips the checksum check of a local folder (which reads every file):
    for a process that is not the one of a group that verifies it.
    """
    name = os.fspath(model)
    if is_local_path(name):
        folder = Path(name).expanduser()
        _check_pipeline_folder(folder, name)
        if verify:
            verify_folder(folder, name)
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(folder, **_dtype_kwarg(torch_dtype), **components)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(
                f"{name} could not be loaded as an SD3 pipeline ({type(exc).__name__}: {_first_line(exc)}); "
                "re-create it with `sd35flash pretrain` / `distill`"
            ) from exc
    else:
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(name, revision=revision, **_dtype_kwarg(torch_dtype),
                                                            **components)
        except _hub_errors() as exc:
            raise UserError(
                f"model {name}{'@' + revision if revision else ''} could not be downloaded from the Hugging Face hub "
                f"({type(exc).__name__}: {_first_line(exc)}); check the id, your network, and your HF token "
                "(`hf auth login`, and accept the model licence on its hub page), or pass an existing local folder"
            ) from exc
    return pipe.to(device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if not text:
        return ""
    return text[0] if len(text[0]) <= 240 else text[0][:240] + "..."


def _check_extra_name(rel: str) -> Path:
    path = Path(rel)
    if path.is_absolute() or not path.parts or ".." in path.parts:
        raise UserError(f"extra file name {rel!r} must be a relative path inside the model folder")
    return path


def save_pipeline(
    pipe: StableDiffusion3Pipeline,
    out_dir: str | os.PathLike[str],
    extra_files: dict[str, str | bytes] | None = None,
    extra_models: dict[str, Any] | None = None,
) -> Path:
    """Save ``pipe`` (safetensors) plus ``extra_files`` to ``out_dir``, atomically.

    ``extra_files`` maps paths relative to the folder (e.g. ``"sd35flash.json"``) to text or bytes;
    ``extra_models`` maps subfolder names to diffusers models saved beside the pipeline's own
    components (e.g. split-timestep branches; ``model_index.json`` does not list them, so stock
    ``from_pretrained`` ignores them).
    The folder is written through :func:`sd35flash.io.staged_dir` (a temporary sibling swapped in
    when complete), with ``checksums.sha256`` written last, so a failure leaves ``out_dir`` as it
    was. An existing ``out_dir`` is replaced only when it is a model folder (``model_index.json``)
    or empty: a user's other files are never deleted. Returns the final path.
    """
    target = Path(out_dir).expanduser()
    check_model_output(target, "output folder")
    extras = {rel: data for rel, data in (extra_files or {}).items()}
    for rel in [*extras, *(extra_models or {})]:
        _check_extra_name(rel)
    with staged_dir(target, "model folder") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for rel, model in (extra_models or {}).items():
            model.save_pretrained(tmp / _check_extra_name(rel), safe_serialization=True)
        for rel, data in extras.items():
            dest = tmp / _check_extra_name(rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, bytes):
                dest.write_bytes(data)
            else:
                dest.write_text(data, encoding="utf-8")
        write_checksums(tmp)
        fault_point("save-pipeline")
    return target
