"""Weight quantization of the SD3 transformer (and the T5 encoder): apply, check, save, reload.

Every method replaces the weights of ``nn.Linear`` layers only (attention projections, MLPs,
AdaLN modulation, embedders); convolutions, norms and embeddings keep the module's dtype. The
activations stay in that dtype too, except for ``int8-dynamic`` and ``fp8``, which also quantize
each input row on the fly.

======================  ====  ========  ==============================================================
method                  bits  library   recipe
======================  ====  ========  ==============================================================
``none``                --    --        weights as loaded (fp32 / bf16 / fp16)
``int8-weight``         8     torchao   ``Int8WeightOnlyConfig``: symmetric per-output-row int8
``int8-dynamic``        8     torchao   ``Int8DynamicActivationInt8WeightConfig``: int8 weights per
                                        row, activations quantized per token at run time
``int6-weight``         6     torchao   ``IntxWeightOnlyConfig(int6)``: per group of ``group_size``
                                        input channels (per row where the width is not a multiple)
``int4-weight``         4     torchao   ``IntxWeightOnlyConfig(int4)``, grouped like int6
``qint4``               4     quanto    optimum-quanto ``qint4`` weights, packed two per byte
``fp8``                 8     torchao   ``Float8DynamicActivationFloat8WeightConfig``; needs a CUDA
                                        GPU of compute capability >= 8.9 (Ada, Hopper and later)
======================  ====  ========  ==============================================================

Storage: torchao keeps int6 and int4 values unpacked in int8 containers
(``IntxUnpackedToInt8Tensor``), so they take int8 space in memory and on disk; only ``qint4`` packs.
On this project's CPUs none of these runs faster than fp32 (``int8-dynamic`` is ~10x slower in
eager mode); they save memory. ``torch.compile`` and GPU kernels are where they gain speed.

A quantized module is saved as a folder: ``config.json`` (class and config), ``weights.safetensors``
(torchao's flattened tensor-subclass layout, or quanto's plain state dict, both without pickle) and
``quantization.json`` (method, the layers left unquantized, library versions), plus
``checksums.sha256`` (:mod:`sd35flash.checksums`), which :func:`load_quantized` verifies. :func:`load_quantized`
rebuilds the module on the meta device and assigns the stored tensors, so the full-precision
weights are never materialised.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...checksums import verify_folder, write_checksums
from ...errors import UserError
from ...io import atomic_write_json, atomic_write_text, staged_dir

__all__ = [
    "METHODS",
    "QuantMethod",
    "QuantizationUnsupported",
    "check_supported",
    "get_method",
    "linear_names",
    "load_quantized",
    "quantize_linear",
    "quantize_module",
    "save_quantized",
    "unsupported_reason",
    "weight_bytes",
]

QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
#: Default group size (input channels per scale) for int6 / int4.
GROUP_SIZE = 64


class QuantizationUnsupported(UserError):
    """The requested quantization cannot run on this hardware."""


@dataclass(frozen=True)
class QuantMethod:
    name: str
    bits: int | None
    library: str  # "torchao" | "quanto" | "" (none)
    summary: str
    needs_fp8_gpu: bool = False


METHODS: dict[str, QuantMethod] = {m.name: m for m in (
    QuantMethod("none", None, "", "weights as loaded"),
    QuantMethod("int8-weight", 8, "torchao", "int8 weight-only, per output row"),
    QuantMethod("int8-dynamic", 8, "torchao", "int8 weights + int8 dynamic per-token activations"),
    QuantMethod("int6-weight", 6, "torchao", "int6 weight-only (IntxWeightOnlyConfig), per group"),
    QuantMethod("int4-weight", 4, "torchao", "int4 weight-only (IntxWeightOnlyConfig), per group"),
    QuantMethod("qint4", 4, "quanto", "optimum-quanto qint4 weight-only, packed"),
    QuantMethod("fp8", 8, "torchao", "fp8 e4m3 weights + dynamic fp8 activations", needs_fp8_gpu=True),
)}


def get_method(name: str) -> QuantMethod:
    if name not in METHODS:
        raise UserError(f"unknown quantization method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def unsupported_reason(method: str, device: torch.device | str) -> str | None:
    """Why ``method`` cannot run on ``device`` (``None`` when it can)."""
    m = get_method(method)
    dev = torch.device(device)
    if m.needs_fp8_gpu:
        if dev.type != "cuda" or not torch.cuda.is_available():
            return f"{m.name} needs a CUDA GPU with compute capability >= 8.9 (this device is {dev.type})"
        cap = torch.cuda.get_device_capability(dev)
        if cap < (8, 9):
            return f"{m.name} needs compute capability >= 8.9 (this GPU has {cap[0]}.{cap[1]})"
    return None


def check_supported(method: str, device: torch.device | str) -> None:
    reason = unsupported_reason(method, device)
    if reason is not None:
        raise QuantizationUnsupported(reason)


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """Silence the import-time notices of torchao (optional CUDA extensions it cannot load on this
    machine, a torch pytree deprecation), which would otherwise break one-line CLI errors. A filter,
    not a level: torch's logging set-up resets the levels of its own loggers."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    drop = _DropRecords()
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)


def _torchao_config(method: str, in_features: int, group_size: int):
    with _quiet_import():
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
        )
        from torchao.quantization.granularity import PerAxis, PerGroup
    if method == "int8-weight":
        return Int8WeightOnlyConfig()
    if method == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if method in ("int6-weight", "int4-weight"):
        gran = PerGroup(group_size) if in_features % group_size == 0 else PerAxis(0)
        return IntxWeightOnlyConfig(weight_dtype=torch.int6 if method == "int6-weight" else torch.int4,
                                    granularity=gran)
    if method == "fp8":
        return Float8DynamicActivationFloat8WeightConfig()
    raise ValueError(f"{method} is not a torchao method")


def quantize_linear(linear: nn.Linear, method: str, group_size: int = GROUP_SIZE,
                    copy_first: bool = False) -> nn.Module:
    """Quantize one ``nn.Linear``; returns the module to put in its place (the same module for
    torchao, whose weight becomes a tensor subclass; a ``QLinear`` for quanto). With
    ``copy_first`` the original is left untouched."""
    m = get_method(method)
    if m.library == "":
        return linear
    if copy_first:
        linear = copy.deepcopy(linear)
    holder = nn.Sequential(linear)
    if m.library == "torchao":
        with _quiet_import():
            from torchao.quantization import quantize_

            quantize_(holder, _torchao_config(method, linear.in_features, group_size))
        return holder[0]
    from optimum.quanto import freeze, qint4
    from optimum.quanto import quantize as quanto_quantize

    quanto_quantize(holder, weights=qint4)
    freeze(holder)
    return holder[0]


def linear_names(module: nn.Module) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers of ``module``, in module order."""
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n]


def set_submodule(root: nn.Module, name: str, child: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, child)


def quantize_module(module: nn.Module, method: str, skip: Collection[str] = (), group_size: int = GROUP_SIZE,
                    device: torch.device | str | None = None) -> list[str]:
    """Quantize every ``nn.Linear`` of ``module`` in place except those named in ``skip``.

    Returns the names of the quantized layers. ``device`` (default: where the module is) is checked
    against the method's hardware needs first.
    """
    if device is None:
        p = next(module.parameters(), None)
        device = p.device if p is not None else "cpu"
    check_supported(method, device)
    if get_method(method).library == "":
        return []
    skip = set(skip)
    unknown = skip - set(linear_names(module))
    if unknown:
        raise UserError(f"layers to keep unquantized are not Linear layers of the model: {sorted(unknown)[:5]}")
    done = []
    for name in linear_names(module):
        if name in skip:
            continue
        q = quantize_linear(module.get_submodule(name), method, group_size)
        set_submodule(module, name, q)
        done.append(name)
    return done


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers as stored (quantized data + scales for tensor
    subclasses, counted through their flattened safetensors layout)."""
    state = _flatten(module, "torchao" if _has_subclass(module) else "")[0]
    seen: set[int] = set()
    total = 0
    for t in state.values():
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


# -- save / load ------------------------------------------------------------------------------------

def _module_classes() -> dict[str, type]:
    from diffusers import SD3Transformer2DModel
    from transformers import T5EncoderModel

    return {"SD3Transformer2DModel": SD3Transformer2DModel, "T5EncoderModel": T5EncoderModel}


def _config_dict(module: nn.Module) -> dict:
    cfg = module.config
    return dict(cfg.to_dict()) if hasattr(cfg, "to_dict") else dict(cfg)


def _has_subclass(module: nn.Module) -> bool:
    return any(type(t) not in (torch.Tensor, nn.Parameter) for t in module.state_dict().values())


def _flatten(module: nn.Module, library: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    state = module.state_dict()
    if library == "torchao":
        with _quiet_import():
            from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
        return flatten_tensor_state_dict(state)
    return {k: v for k, v in state.items()}, {}


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied weights, e.g. T5's embeddings);
    returns the kept tensors and ``alias -> kept name``."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for k, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in first and t.numel() > 0:
            aliases[k] = first[key]
            continue
        first[key] = k
        out[k] = t.contiguous()
    return out, aliases


def save_quantized(module: nn.Module, folder: str | Path, method: str, kept: Collection[str] = (),
                   extra: dict | None = None) -> Path:
    """Write ``module`` (quantized with ``method``, ``kept`` layers left alone) to ``folder`` atomically."""
    from safetensors.torch import save_file

    classes = _module_classes()
    name = type(module).__name__
    if name not in classes:
        raise UserError(f"saving quantized {name} is not supported; supported: {', '.join(classes)}")
    m = get_method(method)
    tensors, meta = _flatten(module, m.library if m.library == "torchao" else "")
    qmap = None
    if m.library == "quanto":
        from optimum.quanto import quantization_map

        qmap = quantization_map(module)
    tensors, aliases = _dedupe(tensors)
    info = {"class": name, "method": method, "bits": m.bits, "kept": list(kept), "aliases": aliases,
            "quantization_map": qmap, "versions": _versions(), **(extra or {})}
    folder = Path(folder)
    with staged_dir(folder) as tmp:
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE), metadata=meta or None)
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(_config_dict(module), indent=1, default=str))
        atomic_write_json(tmp / QUANT_FILE, info)
        write_checksums(tmp)
    return folder


def read_quant_info(folder: str | Path) -> dict:
    path = Path(folder) / QUANT_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not a quantized checkpoint (no {QUANT_FILE}); make one with save_quantized")
    return json.loads(path.read_text())


def load_quantized(folder: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a module saved by :func:`save_quantized` (on the meta device, then assign the tensors)."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    info = read_quant_info(folder)
    verify_folder(folder)
    method = info["method"]
    check_supported(method, device)
    cls = _module_classes().get(info["class"])
    if cls is None:
        raise UserError(f"{folder}: unknown module class {info['class']!r}")
    config = json.loads((folder / CONFIG_FILE).read_text())
    with init_empty_weights():
        if info["class"] == "T5EncoderModel":
            from transformers import T5Config

            module = cls(T5Config.from_dict(config))
        else:
            module = cls.from_config(config)
    tensors = load_file(str(folder / WEIGHTS_FILE), device="cpu")
    with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
        meta = f.metadata() or {}
    for alias, src in info.get("aliases", {}).items():
        tensors[alias] = tensors[src]
    library = get_method(method).library
    if library == "quanto":
        from optimum.quanto import requantize

        requantize(module, tensors, info["quantization_map"], device=torch.device("cpu"))
    else:
        if library == "torchao":
            with _quiet_import():
                from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
            for alias, src in info.get("aliases", {}).items():
                meta.setdefault(alias, meta.get(src, json.dumps({"_type": "Tensor"})))
            if meta:
                names = json.loads(meta["tensor_names"]) + list(info.get("aliases", {}))
                meta["tensor_names"] = json.dumps(sorted(set(names)))
            tensors, left = unflatten_tensor_state_dict(tensors, meta)
            if left:
                raise UserError(f"{folder}: {WEIGHTS_FILE} holds tensors the model does not use: {sorted(left)[:5]}")
        module.load_state_dict(tensors, strict=True, assign=True)
    return module.eval().to(device)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "torchao", "optimum-quanto", "diffusers", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
