"""Prompt sources: the built-in shapes world, or a user's ``.txt`` / ``.jsonl`` / ``.parquet`` file.

Distillation is prompt-only (DMD needs no images). Every source is a fixed, ordered list: file
order for files, the split's order for the shapes world, so the same source gives the same prompts
on every process and every run.

* ``.txt`` (or any other suffix): one prompt a line; blank lines are skipped.
* ``.jsonl``: one JSON object a line, with a ``prompt`` (or ``text``) string. A shapes-world scene
  spec line (``category``, ``objects``, ...) is accepted too and keeps its spec (its prompt is the
  spec's canonical prompt, or the line's ``prompt``); ``{"prompt": ..., "spec": {...}}`` keeps both.
  The source carries specs only when every line has one.
* ``.parquet``: read with Hugging Face ``datasets`` (``Dataset.from_parquet``), column ``prompt``
  or ``text`` (or the one named by ``column``).
* A folder written by ``sd35flash prepare``: its ``prompts.jsonl``.

Prompts longer than the text encoders' context are not an error here: the tokenizers truncate
them (CLIP at 77 tokens), and ``sd35flash prepare`` says how many once
(:func:`sd35flash.text.encoder.count_truncated`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..seeds import EPOCH_STRIDE, derive_seed
from ..world import SceneSpec, canonical_prompt, paraphrase, split_specs
from ..world.spec import SpecError

__all__ = ["PREPARED_PROMPTS", "PromptDataset", "PromptSource", "file_prompts", "load_prompts", "shapes_prompts",
           "write_prompts"]

#: The ordered prompt list a ``sd35flash prepare`` folder keeps (one ``{"prompt", "spec"?}`` object a line).
PREPARED_PROMPTS = "prompts.jsonl"
_PROMPT_KEYS = ("prompt", "text")
_SPEC_KEYS = ("category", "objects")


@dataclass
class PromptSource:
    """A fixed, ordered list of training prompts; ``specs[i]`` is the scene of ``prompts[i]`` when known."""

    name: str
    prompts: list[str]
    specs: list[SceneSpec] | None = None

    def __len__(self) -> int:
        return len(self.prompts)


def shapes_prompts(n: int, seed: int = 0) -> PromptSource:
    """``n`` shapes-world ``train`` specs, each with one paraphrase fixed by ``seed`` and its index."""
    specs = split_specs("train", n, seed=seed + 31)
    prompts = [paraphrase(s, random.Random(derive_seed(seed, i))) for i, s in enumerate(specs)]
    return PromptSource("shapes", prompts, specs)


def _read_lines(p: Path) -> list[str]:
    if p.is_dir():
        raise UserError(f"prompt file {p} is a folder; pass a .txt, .jsonl or .parquet file (or a `prepare` folder)")
    if not p.is_file():
        raise UserError(f"prompt file {p} does not exist; pass --prompts shapes or a .txt, .jsonl or .parquet file")
    try:
        return p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read prompt file {p} ({e.strerror or e})") from None


def _spec(obj: Any, where: str) -> SceneSpec:
    try:
        return SceneSpec.from_dict(obj)
    except SpecError as e:
        raise UserError(f"{where}: {e}") from None


def _jsonl_entry(line: str, where: str) -> tuple[str, SceneSpec | None]:
    """(prompt, spec or None) from one JSON Lines line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise UserError(f"{where} is not valid JSON; write one {{\"prompt\": \"...\"}} object per line") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where} must be a JSON object with a \"prompt\" field")
    key = next((k for k in _PROMPT_KEYS if k in obj), None)
    text = obj.get(key) if key else None
    if key is not None and (not isinstance(text, str) or not text.strip()):
        raise UserError(f"{where}: field \"{key}\" must be a non-empty string")
    spec = None
    if "spec" in obj:
        spec = _spec(obj["spec"], where)
    elif all(k in obj for k in _SPEC_KEYS):
        spec = _spec({k: v for k, v in obj.items() if k not in _PROMPT_KEYS}, where)
    if text is None and spec is None:
        raise UserError(f"{where} needs a non-empty string field \"prompt\" (or \"text\"), "
                        "or a shapes-world scene spec")
    return (text.strip() if text is not None else canonical_prompt(spec)), spec


def _parquet_prompts(p: Path, column: str | None) -> list[str]:
    if not p.is_file():
        raise UserError(f"prompt file {p} does not exist; pass --prompts shapes or a .txt, .jsonl or .parquet file")
    try:
        import pyarrow.parquet as pq
        from datasets import Dataset
    except ImportError:
        raise UserError("reading .parquet prompts needs the `datasets` package; pip install datasets") from None
    try:
        names = pq.read_schema(p).names
    except Exception as e:  # pyarrow raises ArrowInvalid and friends for a non-parquet file
        raise UserError(f"prompt file {p} is not a readable parquet file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if column is None:
        column = next((c for c in _PROMPT_KEYS if c in names), None)
        if column is None:
            raise UserError(f"{p} has no \"prompt\" or \"text\" column (columns: {', '.join(names)}); "
                            "pass --prompt-column NAME")
    elif column not in names:
        raise UserError(f"{p} has no column {column!r} (columns: {', '.join(names)}); pass --prompt-column NAME")
    from ..paths import cache_root

    ds = Dataset.from_parquet(str(p), columns=[column], keep_in_memory=True,
                              cache_dir=str(cache_root() / "hf-datasets"))
    prompts = []
    for i, v in enumerate(ds[column]):
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        if not isinstance(v, str):
            raise UserError(f"{p} row {i}: column {column!r} holds {type(v).__name__}, not text; "
                            "pass --prompt-column with a string column")
        prompts.append(v.strip())
    return prompts


def file_prompts(path: str | Path, column: str | None = None) -> PromptSource:
    """Prompts from a file or a ``prepare`` folder (see the module docstring for the formats)."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / PREPARED_PROMPTS).is_file():
        p = p / PREPARED_PROMPTS
    kind = p.suffix.lower()
    if column is not None and kind != ".parquet":
        raise UserError(f"--prompt-column applies to .parquet prompt files; {p} is not one")
    specs: list[SceneSpec | None] = []
    if kind == ".parquet":
        prompts = _parquet_prompts(p, column)
    else:
        prompts = []
        for no, line in enumerate(_read_lines(p), 1):
            if not line.strip():
                continue
            if kind == ".jsonl":
                prompt, spec = _jsonl_entry(line, f"{p}:{no}")
                prompts.append(prompt)
                specs.append(spec)
            else:
                prompts.append(line.strip())
    if not prompts:
        raise UserError(f"prompt file {p} holds no prompts; write one prompt per line (or {{\"prompt\": ...}} lines)")
    known = specs if specs and all(s is not None for s in specs) else None
    return PromptSource(p.name, prompts, known)  # type: ignore[arg-type]


def write_prompts(path: str | Path, source: PromptSource) -> Path:
    """Write ``source`` as JSON Lines (``{"prompt", "spec"?}`` a line), atomically; :func:`file_prompts`
    reads it back."""
    from ..io import atomic_write_text

    lines = []
    for i, prompt in enumerate(source.prompts):
        obj: dict[str, Any] = {"prompt": prompt}
        if source.specs is not None:
            obj["spec"] = source.specs[i].to_dict()
        lines.append(json.dumps(obj, ensure_ascii=False))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def load_prompts(source: str, n: int, seed: int = 0, column: str | None = None) -> PromptSource:
    """``shapes`` -> :func:`shapes_prompts` (``n`` scenes); anything else is a prompt file or ``prepare`` folder."""
    if source == "shapes":
        return shapes_prompts(n, seed)
    return file_prompts(source, column)


class PromptDataset:
    """This rank's prompts for one epoch: a (seed, epoch)-seeded permutation, dealt round-robin.

    Epoch ``e``'s order is ``randperm(n)`` from a generator seeded with ``seed * 100_003 + e``
    (``shuffle=False``: file order), identical on every rank; rank ``r`` of ``W`` takes positions
    ``r, r + W, r + 2W, ...``. The ranks together cover every prompt exactly once per epoch (ranks
    may differ in length by one). Iterating yields ``(index, prompt)``.
    """

    def __init__(self, prompts: PromptSource | Sequence[str], rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.prompts = list(prompts.prompts if isinstance(prompts, PromptSource) else prompts)
        if not self.prompts:
            raise ValueError("PromptDataset needs at least one prompt")
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's prompt indices for ``epoch`` (default: the current one)."""
        e = self.epoch if epoch is None else int(epoch)
        n = len(self.prompts)
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, e, EPOCH_STRIDE))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = len(self.prompts)
        return n // self.world_size + (1 if self.rank < n % self.world_size else 0)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        for i in self.indices():
            yield i, self.prompts[i]
