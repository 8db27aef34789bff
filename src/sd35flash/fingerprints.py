"""Fingerprints of networks: a hash that changes when a module's config or weights change, used to key
caches of things derived from a model. (Configs are fingerprinted by :func:`sd35flash.config.fingerprint`.)

Two strengths, because the caches need different guarantees:

* :func:`hash_module_sampled` -- config (without keys that differ between a model built in memory
  and the same model saved and reloaded), every tensor's name, type, dtype and shape, and a strided
  sample of at most ``SAMPLES_PER_TENSOR`` values per tensor. Cheap on multi-billion-parameter
  encoders; keys the prompt-embedding caches (``text/``) and the sensitivity-scan cache
  (``deploy/runtime/pipeline.py``). Quantized tensor subclasses and meta tensors contribute their
  header only, so fingerprint before quantizing.
* :func:`hash_module_exact` -- config, class name and every byte of every tensor, in name order.
  Keys the ONNX export cache (``deploy/export/``), where any change to any weight must make a new
  export.

Both feed a ``hashlib`` object the caller owns, so one digest can cover several modules and settings.
The byte streams are part of the cache keys: changing them orphans existing caches.
"""

from __future__ import annotations

import json
from typing import Any

import torch

__all__ = ["SAMPLES_PER_TENSOR", "hash_module_exact", "hash_module_sampled"]

#: Values hashed per tensor by :func:`hash_module_sampled` (a strided sample).
SAMPLES_PER_TENSOR = 4096
#: Config keys that differ between a model built in memory and the same model saved and reloaded;
#: the weights' dtypes are hashed per tensor.
UNHASHED_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")


def hash_module_sampled(h: Any, name: str, module: torch.nn.Module | None) -> None:
    """Feed ``h`` with ``[name]``, then ``module``'s config, tensor headers and sampled values (or
    ``none`` for an absent module)."""
    h.update(f"[{name}]".encode())
    if module is None:
        h.update(b"none")
        return
    cfg = getattr(module, "config", None)
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    for key in UNHASHED_CONFIG_KEYS:
        cfg.pop(key, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for pname, t in module.state_dict().items():
        h.update(f"{pname}:{type(t).__name__}:{t.dtype}:{tuple(t.shape)}".encode())
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type == "meta":
            continue  # quantized tensor subclasses: name/type/shape only (fingerprint before quantizing)
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        h.update(flat[::step][:SAMPLES_PER_TENSOR].float().cpu().numpy().tobytes())


def hash_module_exact(h: Any, module: torch.nn.Module) -> None:
    """Feed ``h`` with ``module``'s config, class name and every tensor's name, shape, dtype and bytes."""
    config = getattr(module, "config", None)
    if config is not None:
        cfg = dict(config) if not hasattr(config, "to_dict") else config.to_dict()
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(type(module).__name__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
