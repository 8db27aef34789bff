"""Prompt encoding shared by training and deployment: the text-encoder fingerprint, a per-prompt
embedding cache on disk, and freeing the encoders once the prompts of a job are encoded.

* **Fingerprint.** :func:`encoder_fingerprint` hashes the encoders' configs, a strided sample of
  every weight tensor (with names, shapes and dtypes), the tokenizers' settings, the ``use_t5`` flag
  and a variant string (e.g. ``t5=int8``), so stored embeddings are never reused for another model,
  precision or T5 setting. The per-prompt cache here and the sharded store (:mod:`.store`) both
  key on it.
* **T5 off.** SD3 was trained with independent text-encoder dropout, so the pipeline may run
  without T5-XXL: its block of the conditioning is zeros (``sampling.encode_prompts(use_t5=False)``,
  exactly what ``StableDiffusion3Pipeline`` feeds when ``text_encoder_3`` is ``None``).
* **Embedding cache.** ``<root>/<fingerprint>/<sha256(prompt)>.safetensors`` holds one prompt's
  ``embeds`` (L, D) and ``pooled`` (P,). Writes are atomic (temporary file, then rename).
* **Freeing.** :func:`free_encoders` (and :meth:`PromptEncoder.free`) drops the three encoders from
  the pipeline (and empties the CUDA cache); embeddings already computed stay available in memory
  and on disk.
"""

from __future__ import annotations

import gc
import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..errors import UserError
from ..fingerprints import hash_module_sampled
from ..io import atomic_write
from ..paths import cache_root
from ..sampling import PromptEmbeds, clip_length, encode_prompts, t5_length

__all__ = ["ENCODER_NAMES", "PromptEncoder", "check_writable", "count_truncated", "default_cache_dir",
           "encoder_fingerprint", "free_encoders"]

ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")


def default_cache_dir() -> Path:
    return cache_root() / "prompt-embeds"


def encoder_fingerprint(pipe, use_t5: bool, variant: str = "") -> str:
    """A short hash identifying what the encoders would output (see the module docstring)."""
    h = hashlib.sha256()
    for name in ENCODER_NAMES:
        hash_module_sampled(h, name, getattr(pipe, name, None) if (name != "text_encoder_3" or use_t5) else None)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None)
        if tok is not None:
            h.update(f"{name}:{type(tok).__name__}:{tok.model_max_length}:{len(tok)}".encode())
    h.update(f"use_t5={use_t5};t5_len={t5_length(pipe)};{variant}".encode())
    return h.hexdigest()[:20]


def free_encoders(pipe) -> None:
    """Drop the pipeline's three text encoders (tokenizers stay) and release their memory."""
    for name in ENCODER_NAMES:
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def count_truncated(pipe, prompts: Sequence[str], chunk: int = 4096) -> dict[str, int]:
    """How many ``prompts`` the pipeline's tokenizers cut: ``{"clip": n, "t5": m}`` (CLIP keeps
    ``clip_length`` tokens, T5 ``t5_length``, special tokens included)."""
    limits = {"clip": (getattr(pipe, "tokenizer", None), clip_length(pipe)),
              "t5": (getattr(pipe, "tokenizer_3", None), t5_length(pipe))}
    out = {}
    for name, (tok, limit) in limits.items():
        n = 0
        if tok is not None:
            for start in range(0, len(prompts), chunk):
                ids = tok(list(prompts[start : start + chunk]), truncation=False)["input_ids"]
                n += sum(len(x) > limit for x in ids)
        out[name] = n
    return out


def check_writable(folder: Path) -> None:
    """One-line :class:`UserError` unless ``folder`` can be created and written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"the prompt-embedding cache {folder} is not writable ({e.strerror or e}); "
                        "set SD35FLASH_CACHE to a writable folder or pass --no-embed-cache") from None


class PromptEncoder:
    """Prompts -> :class:`PromptEmbeds`, looked up in memory, then on disk, then encoded.

    ``cache_dir=None`` disables the disk cache. ``free_after_encoding`` frees the encoders at the
    end of :meth:`preload`. Counters: ``hits`` (prompts served from disk), ``encoded`` (prompts
    run through the encoders).
    """

    def __init__(self, pipe, use_t5: bool = True, cache_dir: str | Path | None = None,
                 free_after_encoding: bool = False, device: torch.device | str | None = None,
                 variant: str = "", batch_size: int = 32) -> None:
        self.pipe = pipe
        self.use_t5 = bool(use_t5 and getattr(pipe, "text_encoder_3", None) is not None)
        self.device = torch.device(device) if device is not None else pipe._execution_device
        self.free_after_encoding = free_after_encoding
        self.batch_size = batch_size
        self.freed = False
        self.hits = 0
        self.encoded = 0
        self._memory: dict[str, PromptEmbeds] = {}
        self.fingerprint = encoder_fingerprint(pipe, self.use_t5, variant)
        self.cache_dir: Path | None = None
        if cache_dir is not None:
            self.cache_dir = Path(cache_dir).expanduser() / self.fingerprint
            check_writable(self.cache_dir)

    # -- cache files ---------------------------------------------------------------------------
    def _path(self, prompt: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / (hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32] + ".safetensors")

    def _read(self, prompt: str) -> PromptEmbeds | None:
        if self.cache_dir is None:
            return None
        path = self._path(prompt)
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("prompt") != prompt:
                    return None  # a hash collision, or a foreign file
                return PromptEmbeds(f.get_tensor("embeds")[None], f.get_tensor("pooled")[None])
        except Exception:  # a damaged entry is treated as a miss and rewritten
            return None

    def _write(self, prompt: str, pe: PromptEmbeds) -> None:
        if self.cache_dir is None:
            return
        from safetensors.torch import save_file

        tensors = {"embeds": pe.embeds[0].detach().cpu().contiguous(),
                   "pooled": pe.pooled[0].detach().cpu().contiguous()}
        atomic_write(self._path(prompt), lambda tmp: save_file(tensors, str(tmp), metadata={
            "prompt": prompt, "fingerprint": self.fingerprint}), "prompt-embedding cache entry")

    # -- encoding ------------------------------------------------------------------------------
    def _lookup(self, prompt: str) -> PromptEmbeds | None:
        pe = self._memory.get(prompt)
        if pe is None:
            pe = self._read(prompt)
            if pe is not None:
                self.hits += 1
                self._memory[prompt] = pe
        return pe

    def _encode_missing(self, prompts: Iterable[str]) -> None:
        todo = [p for p in dict.fromkeys(prompts) if self._lookup(p) is None]
        if todo and self.freed:
            raise RuntimeError(f"the text encoders were freed but {len(todo)} prompt(s) are not encoded yet "
                               "(preload every prompt of the job before freeing)")
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            pe = encode_prompts(self.pipe, chunk, use_t5=self.use_t5, device=self.device)
            self.encoded += len(chunk)
            for i, p in enumerate(chunk):
                one = PromptEmbeds(pe.embeds[i : i + 1].detach().cpu(), pe.pooled[i : i + 1].detach().cpu())
                self._memory[p] = one
                self._write(p, one)

    def __call__(self, prompts: Sequence[str]) -> PromptEmbeds:
        prompts = list(prompts)
        self._encode_missing(prompts)
        return PromptEmbeds.cat([self._memory[p] for p in prompts]).to(self.device)

    def preload(self, prompts: Iterable[str]) -> None:
        """Encode every prompt of a job (memory, disk or encoders), then free the encoders if asked."""
        self._encode_missing(list(prompts))
        if self.free_after_encoding:
            self.free()

    def free(self) -> None:
        """Drop the text encoders from the pipeline and release their memory."""
        free_encoders(self.pipe)
        self.freed = True
