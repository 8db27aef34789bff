"""The memory planner (`sd35flash plan`): how much memory a device preset needs for a model at a resolution.

Three ingredients, the first and last from :mod:`sd35flash.plan.architecture`:

1. **Exact parameter counts** of the five networks, built on the meta device.
2. **Bytes per parameter under the preset** (:data:`PRESET_MEMORY`): a
   :class:`~sd35flash.plan.architecture.WeightFormat` per component.
3. **Activations** per resolution, from the activation formulas.

``peak = max over phases (encode, denoise, decode) of (weights resident in the phase + the phase's
activations)``. Not counted: the CUDA context and allocator fragmentation (add ~0.3-1 GiB on a GPU),
the Python process and libraries on a CPU (RSS).

The preset recipes (precision, quantization, T5, freeing encoders, backend) come from the
device-preset registry of ``deploy/runtime/presets.py``: :func:`memory_recipe` turns each into the weight
formats the planner counts (:data:`PRESET_MEMORY`). A preset with an error budget (mixed precision)
is planned as if every linear layer were quantized; the layers its sensitivity scan keeps in 16-bit
add to that.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from sd35flash.deploy.runtime.presets import PRESETS, Preset
from sd35flash.errors import UserError
from sd35flash.plan.architecture import (
    BF16,
    FP8_ROWWISE,
    FP16,
    FP32,
    GIB,
    INT4_GROUP32,
    INT6_GROUP32,
    INT8_WEIGHT_ONLY,
    ORT_INT8,
    QINT4_GROUP128,
    Architecture,
    WeightFormat,
    component_stats,
    load_architecture,
    text_encoder_activation_elements,
    transformer_activation_elements,
    vae_decode_activation_elements,
)

__all__ = ["PRESET_MEMORY", "PresetMemory", "memory_recipe", "plan_memory", "plan_to_text"]


@dataclass(frozen=True)
class PresetMemory:
    """What the planner needs to know of a device preset."""

    name: str
    description: str
    use_t5: bool
    activation_bytes: int
    transformer: WeightFormat
    text_encoders: WeightFormat
    vae: WeightFormat
    free_encoders: bool = False  # encoders run first and are freed before the transformer and VAE load
    t5: WeightFormat | None = None  # T5's format when it differs from the CLIPs'

    @property
    def t5_format(self) -> WeightFormat:
        return self.t5 or self.text_encoders


PRECISION_FORMATS = {"fp32": FP32, "bf16": BF16, "fp16": FP16}
QUANT_FORMATS = {"int8-weight": INT8_WEIGHT_ONLY, "int8-dynamic": INT8_WEIGHT_ONLY, "int6-weight": INT6_GROUP32,
                 "int4-weight": INT4_GROUP32, "qint4": QINT4_GROUP128, "fp8": FP8_ROWWISE}


def memory_recipe(preset: Preset) -> PresetMemory:
    """The weight formats of a device preset (``deploy/runtime/presets.py``) as the planner counts them: the
    onnx backend quantizes the transformer and the text encoders to onnxruntime int8 (``onnx_export``),
    torchao / quanto quantize the transformer's linear layers, ``t5: int8`` stores T5 int8 weight-only,
    and everything else is kept in the preset's precision."""
    base = PRECISION_FORMATS[preset.precision]
    act = 4 if preset.precision == "fp32" else 2
    if preset.backend == "onnx":
        return PresetMemory(preset.name, preset.summary, preset.use_t5, act, ORT_INT8, ORT_INT8, base,
                            preset.free_encoders)
    transformer = QUANT_FORMATS.get(preset.quantization, base)
    t5 = INT8_WEIGHT_ONLY if preset.t5 == "int8" else None
    return PresetMemory(preset.name, preset.summary, preset.use_t5, act, transformer, base, base,
                        preset.free_encoders, t5)


PRESET_MEMORY: dict[str, PresetMemory] = {name: memory_recipe(p) for name, p in PRESETS.items()}


def _preset(name: str) -> PresetMemory:
    if name not in PRESET_MEMORY:
        raise UserError(f"unknown preset {name!r}; presets: {', '.join(PRESET_MEMORY)}")
    return PRESET_MEMORY[name]


def plan_memory(config: str | os.PathLike[str] | Architecture, preset: str, resolution: int, cfg: bool = False,
                batch: int = 1, free_encoders: bool | None = None) -> dict[str, Any]:
    """The memory plan as a JSON-ready dict: ``peak_gib``, ``weights_gib``, ``activations_gib``,
    ``phases`` (GiB per phase), ``components`` (params, buffers, bytes, format, loaded, activation
    bytes per part) and the assumptions behind them. ``free_encoders`` overrides the preset's."""
    p = _preset(preset)
    if free_encoders is not None:
        p = dataclasses.replace(p, free_encoders=free_encoders)
    arch = config if isinstance(config, Architecture) else load_architecture(config)
    vae_cfg = arch.configs["vae"]
    vae_scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    tr_cfg = arch.configs["transformer"]
    if resolution % (vae_scale * tr_cfg["patch_size"]):
        raise UserError(f"--resolution {resolution} must be a multiple of {vae_scale * tr_cfg['patch_size']}")
    stats = component_stats(json.dumps(arch.configs, sort_keys=True))
    text_tokens = arch.clip_tokens + arch.t5_tokens
    per_forward = batch * (2 if cfg else 1)
    ab = p.activation_bytes
    formats = {"transformer": p.transformer, "clip_l": p.text_encoders, "clip_g": p.text_encoders,
               "t5": p.t5_format, "vae": p.vae}
    acts = {
        "transformer": transformer_activation_elements(tr_cfg, resolution, text_tokens, per_forward, vae_scale) * ab,
        "clip_l": text_encoder_activation_elements("clip", arch.configs["text_encoder"], arch.clip_tokens, batch) * ab,
        "clip_g": text_encoder_activation_elements("clip", arch.configs["text_encoder_2"], arch.clip_tokens,
                                                   batch) * ab,
        "t5": text_encoder_activation_elements("t5", arch.configs["text_encoder_3"], arch.t5_tokens, batch) * ab
        if arch.configs.get("text_encoder_3") else 0,
        "vae": vae_decode_activation_elements(vae_cfg, resolution, batch) * ab,
    }
    components: dict[str, Any] = {}
    for name, st in stats.items():
        if st is None:
            components[name] = {"params": 0, "buffers": 0, "bytes": 0, "gib": 0.0, "format": None, "loaded": False,
                                "activation_bytes": 0, "note": "not in this pipeline"}
            continue
        loaded = name != "t5" or p.use_t5
        nbytes = st.weight_bytes(formats[name]) if loaded else 0
        components[name] = {"params": st.params, "buffers": st.buffers, "bytes": nbytes, "gib": nbytes / GIB,
                            "format": formats[name].name if loaded else None, "loaded": loaded,
                            "activation_bytes": acts[name] if loaded else 0,
                            "linear_params": st.linear, "embedding_params": st.embedding}
    enc = [c for c in ("clip_l", "clip_g", "t5") if components[c]["loaded"]]
    enc_bytes = sum(components[c]["bytes"] for c in enc)
    main_bytes = components["transformer"]["bytes"] + components["vae"]["bytes"]
    enc_act = max((components[c]["activation_bytes"] for c in enc), default=0)
    resident_after_encode = main_bytes + (0 if p.free_encoders else enc_bytes)
    phases = {
        "encode": (enc_bytes if p.free_encoders else enc_bytes + main_bytes) + enc_act,
        "denoise": resident_after_encode + components["transformer"]["activation_bytes"],
        "decode": resident_after_encode + components["vae"]["activation_bytes"],
    }
    peak_phase = max(phases, key=phases.get)
    weights = enc_bytes + main_bytes
    activations = max(enc_act, components["transformer"]["activation_bytes"], components["vae"]["activation_bytes"])
    side = resolution // vae_scale
    return {
        "config": arch.name, "preset": p.name, "preset_description": p.description, "resolution": resolution,
        "batch": batch, "cfg": cfg,
        "peak_gib": phases[peak_phase] / GIB, "weights_gib": weights / GIB, "activations_gib": activations / GIB,
        "peak_phase": peak_phase, "phases": {k: v / GIB for k, v in phases.items()},
        "tokens": {"image": (side // tr_cfg["patch_size"]) ** 2, "text": text_tokens},
        "activation_bytes_per_element": ab, "free_encoders": p.free_encoders,
        "components": components,
        "not_counted": "CUDA context and allocator fragmentation on GPU; interpreter and libraries (RSS) on CPU",
    }


def plan_to_text(plan: dict[str, Any]) -> str:
    """A short human-readable table of a plan."""
    lines = [f"{plan['config']} / {plan['preset']} at {plan['resolution']} px, batch {plan['batch']}"
             f"{', CFG' if plan['cfg'] else ''}: peak {plan['peak_gib']:.2f} GiB ({plan['peak_phase']}), "
             f"weights {plan['weights_gib']:.2f} GiB, activations {plan['activations_gib']:.2f} GiB"]
    for name, c in plan["components"].items():
        total = (c["params"] + c["buffers"]) / 1e9
        state = c["format"] if c["loaded"] else "not loaded"
        lines.append(f"  {name:<12} {total:6.3f} B params  {c['gib']:7.3f} GiB  "
                     f"act {c['activation_bytes'] / GIB:6.3f} GiB  {state}")
    return "\n".join(lines)
