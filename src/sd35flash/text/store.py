"""The sharded prompt-embedding store: SD3 conditioning computed once, then read lazily by every rank.

A store folder holds::

    index.json                              format, encoder fingerprint, dtype, shapes, shard names,
                                            prompt -> [shard, row]
    embeds-00000-of-00004.safetensors       prompt_embeds (N, L, D), pooled_prompt_embeds (N, P)
    ...                                     (metadata: fingerprint, shard, dtype, the N prompts as JSON)

``prompt_embeds`` and ``pooled_prompt_embeds`` are what ``StableDiffusion3Pipeline.encode_prompt``
returns (:func:`sd35flash.sampling.encode_prompts`), cast to the store's dtype (bf16 / fp16 / fp32).
The store's prompts are the unique prompts of a source in first-seen order, with the empty prompt
(the CFG negative) first; shard ``s`` holds prompts ``[s S, (s + 1) S)`` for shard size ``S``.

* **T5 variants.** A store built with T5 also serves the T5-dropped conditioning: SD3's no-T5 input
  is the same CLIP block with zeros in the T5 slots (``get(..., t5=False)``), exactly what
  ``encode_prompts(use_t5=False)`` gives. A store built without T5 has zeros there already.
* **Fingerprint.** ``index.json`` records :func:`~sd35flash.text.encoder.encoder_fingerprint` of the
  encoders that wrote it; opening a store with another fingerprint is a one-line error.
* **Writing.** Shards are assigned round-robin to ranks (shard ``s`` to rank ``s mod W``), each
  written atomically (temporary file, then rename). A shard whose file opens and whose metadata
  matches (fingerprint, dtype, prompts) is finished and skipped on resume; anything else is rebuilt.
  ``index.json`` is written last, once every shard is finished, so its presence means complete.
* **Reading.** Only ``index.json`` is read up front; a shard is memory-mapped on first use and only
  the requested rows are copied out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..sampling import PromptEmbeds, drop_encoders

__all__ = ["DTYPES", "INDEX", "EmbeddingStore", "StoreLayout", "StoredConditioner", "prompts_hash",
           "save_safetensors_atomic", "shard_finished", "write_index", "write_shards"]

STORE_FORMAT = 1
INDEX = "index.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
NEGATIVE = ""


@dataclass(frozen=True)
class StoreLayout:
    """Which prompt goes to which shard and row: unique prompts, the empty prompt first, ``shard_size`` a shard."""

    prompts: tuple[str, ...]
    shard_size: int

    @classmethod
    def plan(cls, prompts: Sequence[str], shard_size: int) -> StoreLayout:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if any(not isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        return cls(tuple(dict.fromkeys([NEGATIVE, *prompts])), shard_size)

    @property
    def num_shards(self) -> int:
        return -(-len(self.prompts) // self.shard_size)

    def name(self, shard: int) -> str:
        return f"embeds-{shard:05d}-of-{self.num_shards:05d}.safetensors"

    def shard_prompts(self, shard: int) -> list[str]:
        return list(self.prompts[shard * self.shard_size : (shard + 1) * self.shard_size])

    def shards_for_rank(self, rank: int, world_size: int) -> list[int]:
        """Shard ``s`` belongs to rank ``s mod world_size``."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        return list(range(rank, self.num_shards, world_size))


def prompts_hash(prompts: Sequence[str]) -> str:
    """A short hash of an ordered prompt list."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8") + b"\0")
    return h.hexdigest()[:24]


def shard_finished(path: Path, fingerprint: str, dtype: torch.dtype, prompts: Sequence[str]) -> bool:
    """True when ``path`` is a readable shard written for exactly these prompts, encoders and dtype."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            ok = (meta.get("fingerprint") == fingerprint and meta.get("dtype") == _DTYPE_NAMES[dtype]
                  and meta.get("prompts_sha") == prompts_hash(prompts)
                  and f.get_slice("prompt_embeds").get_shape()[0] == len(prompts)
                  and f.get_slice("pooled_prompt_embeds").get_shape()[0] == len(prompts))
    except Exception:  # truncated or foreign file: rebuild it
        return False
    return ok


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``save_file`` through :func:`sd35flash.io.atomic_write` (a temporary sibling renamed over ``path``)."""
    from safetensors.torch import save_file

    from ..io import atomic_write

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), "embedding shard")


def write_shards(encode: Callable[[list[str]], PromptEmbeds], layout: StoreLayout, folder: str | Path,
                 fingerprint: str, dtype: torch.dtype = torch.bfloat16, batch_size: int = 32, rank: int = 0,
                 world_size: int = 1, progress: Callable[[int], None] | None = None) -> list[int]:
    """Encode and write this rank's unfinished shards; returns the shard numbers it wrote.

    ``encode(prompts)`` returns the pipeline's conditioning for a batch (no CFG batch). ``progress``
    is called with the number of prompts done, skipped shards included.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for s in layout.shards_for_rank(rank, world_size):
        path = folder / layout.name(s)
        prompts = layout.shard_prompts(s)
        for stale in folder.glob(f".{path.name}.tmp-*"):  # a killed writer's leftover (shards have one owner)
            stale.unlink(missing_ok=True)
        if shard_finished(path, fingerprint, dtype, prompts):
            if progress is not None:
                progress(len(prompts))
            continue
        parts = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            with torch.no_grad():
                pe = encode(chunk)
            parts.append(pe.to(device="cpu", dtype=dtype))
            if progress is not None:
                progress(len(chunk))
        pe = PromptEmbeds.cat(parts)
        meta = {"fingerprint": fingerprint, "dtype": _DTYPE_NAMES[dtype], "shard": str(s),
                "prompts_sha": prompts_hash(prompts), "prompts": json.dumps(prompts, ensure_ascii=False)}
        tensors = {"prompt_embeds": pe.embeds.contiguous(), "pooled_prompt_embeds": pe.pooled.contiguous()}
        save_safetensors_atomic(tensors, path, meta)
        written.append(s)
    return written


def write_index(folder: str | Path, layout: StoreLayout, fingerprint: str, dtype: torch.dtype, clip_length: int,
                use_t5: bool, extra: dict | None = None) -> Path:
    """Write ``index.json`` once every shard is finished (a missing or stale shard is a RuntimeError)."""
    from safetensors import safe_open

    from ..io import atomic_write_text

    folder = Path(folder)
    missing = [layout.name(s) for s in range(layout.num_shards)
               if not shard_finished(folder / layout.name(s), fingerprint, dtype, layout.shard_prompts(s))]
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) of {folder} are not written yet, e.g. {missing[0]}")
    with safe_open(str(folder / layout.name(0)), "pt") as f:
        shape = list(f.get_slice("prompt_embeds").get_shape()[1:])
        pooled = int(f.get_slice("pooled_prompt_embeds").get_shape()[1])
    index = {
        "format": STORE_FORMAT, "fingerprint": fingerprint, "dtype": _DTYPE_NAMES[dtype], "use_t5": bool(use_t5),
        "clip_length": int(clip_length), "embeds_shape": shape, "pooled_dim": pooled,
        "shard_size": layout.shard_size, "num_prompts": len(layout.prompts),
        "shards": [layout.name(s) for s in range(layout.num_shards)], **(extra or {}),
        "prompts": {p: [i // layout.shard_size, i % layout.shard_size] for i, p in enumerate(layout.prompts)},
    }
    return atomic_write_text(folder / INDEX, json.dumps(index, ensure_ascii=False))


class EmbeddingStore:
    """Read a store folder: ``get(prompts) -> PromptEmbeds`` (``embeds`` (B, L, D), ``pooled`` (B, P)).

    ``fingerprint`` (the live encoders' :func:`~sd35flash.text.encoder.encoder_fingerprint`), when
    given, must match the store's: a store built with other text encoders is refused.
    """

    def __init__(self, folder: str | Path, fingerprint: str | None = None) -> None:
        self.folder = Path(folder).expanduser()
        path = self.folder / INDEX
        if not path.is_file():
            raise UserError(f"{self.folder} is not a finished embedding store (no {INDEX}); run "
                            "`sd35flash prepare` (with --resume to finish an interrupted one)")
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path} ({e}); run `sd35flash prepare` again") from None
        if index.get("format") != STORE_FORMAT:
            raise UserError(f"{self.folder} is an embedding store of format {index.get('format')}, this version "
                            f"reads format {STORE_FORMAT}; run `sd35flash prepare` again")
        self.index = index
        self.fingerprint: str = index["fingerprint"]
        self.dtype: torch.dtype = DTYPES[index["dtype"]]
        self.use_t5: bool = bool(index["use_t5"])
        self.clip_length: int = int(index["clip_length"])
        self._where: dict[str, list[int]] = index["prompts"]
        self._handles: dict[int, object] = {}
        if fingerprint is not None:
            self.check(fingerprint)

    def check(self, fingerprint: str) -> None:
        """One-line :class:`UserError` unless the store was written by encoders with ``fingerprint``."""
        if fingerprint != self.fingerprint:
            raise UserError(f"the embedding store {self.folder} was built with other text encoders or T5 setting "
                            f"(fingerprint {self.fingerprint}, these encoders {fingerprint}); run `sd35flash prepare` "
                            "for this teacher into a new folder")

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._where

    @property
    def prompts(self) -> list[str]:
        return list(self._where)

    def _shard(self, s: int):
        f = self._handles.get(s)
        if f is None:
            from safetensors import safe_open

            f = safe_open(str(self.folder / self.index["shards"][s]), "pt")
            self._handles[s] = f
        return f

    def get(self, prompts: Sequence[str], device: torch.device | str | None = None, dtype: torch.dtype | None = None,
            t5: bool | None = None) -> PromptEmbeds:
        """The stored conditioning of ``prompts`` (in order). ``t5=False`` zeroes the T5 slots (SD3's
        no-T5 input); ``t5=True`` on a store built without T5 is an error; ``None``: as stored."""
        missing = [p for p in prompts if p not in self._where]
        if missing:
            raise UserError(f"{len(missing)} prompt(s) are not in the embedding store {self.folder}, e.g. "
                            f"{missing[0][:60]!r}; run `sd35flash prepare` with this prompt source")
        if t5 and not self.use_t5:
            raise UserError(f"the embedding store {self.folder} was built without T5; prepare one with T5")
        embeds, pooled = [], []
        for p in prompts:
            s, r = self._where[p]
            f = self._shard(s)
            embeds.append(f.get_slice("prompt_embeds")[r : r + 1])
            pooled.append(f.get_slice("pooled_prompt_embeds")[r : r + 1])
        pe = PromptEmbeds(torch.cat(embeds), torch.cat(pooled))
        if t5 is False and self.use_t5:
            keep = torch.zeros(len(pe), dtype=torch.bool)
            pe = drop_encoders(pe, self.clip_length, keep, ~keep)
        return pe.to(device=device, dtype=dtype)

    def negative(self, batch: int = 1, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> PromptEmbeds:
        """The empty prompt's conditioning (the CFG negative), expanded to ``batch``."""
        u = self.get([NEGATIVE], device=device, dtype=dtype)
        return PromptEmbeds(u.embeds.expand(batch, -1, -1), u.pooled.expand(batch, -1))


class StoredConditioner:
    """Distillation's conditioning read from an :class:`EmbeddingStore` instead of live encoders.

    Same methods as ``distill.models.Conditioner``: ``full`` (teacher and fake), ``for_student``
    (T5 block zeroed where ``drop_t5``), ``uncond`` (the empty prompt), returned in ``dtype``.
    """

    def __init__(self, store: EmbeddingStore, dtype: torch.dtype = torch.float32) -> None:
        self.store = store
        self.dtype = dtype

    def full(self, prompts: Sequence[str], device: torch.device | str) -> PromptEmbeds:
        return self.store.get(list(prompts), device=device, dtype=self.dtype)

    def for_student(self, cond: PromptEmbeds, drop_t5: torch.Tensor) -> PromptEmbeds:
        no_clip = torch.zeros_like(drop_t5, dtype=torch.bool)
        return drop_encoders(cond, self.store.clip_length, no_clip, drop_t5.bool())

    def uncond(self, batch: int, device: torch.device | str) -> PromptEmbeds:
        return self.store.negative(batch, device=device, dtype=self.dtype)
