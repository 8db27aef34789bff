"""Load an SD3 pipeline folder under a device preset: the deployed pipeline.

Steps, in the order that keeps peak memory low:

1. check the preset can run on the device (one-line error naming the presets that can);
2. load the pipeline directly in the preset's dtype; without T5 its weights are never loaded (the
   T5 tokenizer stays: it fixes the length of the zero block the transformer was trained with); a
   prepared quantized transformer / T5 checkpoint replaces the full-precision one at load time;
3. build the :class:`~sd35flash.text.encoder.PromptEncoder` (fingerprint taken before any
   encoder is quantized), then quantize T5 to int8 if asked;
4. quantize the transformer, keeping the layers a sensitivity scan chose when the preset has an
   error budget (the scan's result is cached per transformer fingerprint, method and budget);
5. switch to the onnx backend if the preset asks for it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import UserError
from ...fingerprints import hash_module_sampled
from ...paths import cache_root
from ...text.encoder import PromptEncoder, check_writable, default_cache_dir
from .presets import Preset, check_runnable
from .quantize import get_method, load_quantized, quantize_module, read_quant_info
from .text_encoders import quantize_t5

__all__ = ["DeployedPipeline", "CALIBRATION_PROMPTS", "load_deployed", "resolve_device"]

#: Calibration for the sensitivity scan: the canonical prompts of the first four scenes of the shapes
#: world's val split (``split_specs("val", 4, seed=0)``; tests/test_deploy_runtime.py checks they
#: still are), sampled with the model's own schedule (at most ``CALIBRATION_MAX_STEPS`` steps),
#: transformer inputs kept at 3 steps. Written out so the runtime does not import the shapes world.
CALIBRATION_PROMPTS = (
    "a small cyan circle",
    "a large orange triangle at the bottom",
    "a small blue square and a white circle",
    "a blue square above a small blue triangle",
)
CALIBRATION_MAX_STEPS = 8


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} asked for, but this machine has no CUDA GPU; use --device cpu")
    return dev


@dataclass
class DeployedPipeline:
    pipe: object
    preset: Preset
    encoder: PromptEncoder
    size: int
    quantized_layers: list[str] = field(default_factory=list)
    kept_layers: list[str] = field(default_factory=list)
    sensitivity: dict | None = None

    @property
    def use_t5(self) -> bool:
        return self.encoder.use_t5

    def generate_kwargs(self, prompts: list[str], guidance: float) -> dict:
        """Keyword arguments for ``sampling.generate`` after encoding every prompt of the job."""
        self.encoder.preload(list(prompts) + ([""] if guidance > 1.0 else []))
        return {"encoder": self.encoder, "height": self.size, "width": self.size}


def native_size(pipe) -> int:
    return int(pipe.transformer.config.sample_size) * 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def preset_size(pipe, preset: Preset) -> int:
    """The image side: native, capped by ``max_resolution`` (rounded down to a whole patch)."""
    side = native_size(pipe)
    if preset.max_resolution is None or preset.max_resolution >= side:
        return side
    unit = 2 ** (len(pipe.vae.config.block_out_channels) - 1) * int(pipe.transformer.config.patch_size)
    return max(unit, preset.max_resolution // unit * unit)


def transformer_fingerprint(transformer: torch.nn.Module) -> str:
    h = hashlib.sha256()
    hash_module_sampled(h, "transformer", transformer)
    return h.hexdigest()[:20]


def _scan_cache(transformer, method: str, budget: float) -> Path:
    return cache_root() / "deploy" / "sensitivity" / f"{transformer_fingerprint(transformer)}-{method}-{budget:g}.json"


def _mixed_precision(pipe, model: str, preset: Preset, encoder: PromptEncoder,
                     progress: bool) -> tuple[list[str], dict]:
    """Run (or reuse) the sensitivity scan and leave ``pipe.transformer`` quantized; returns
    (kept layers, report)."""
    from ...io import atomic_write_json
    from ...models.sampling_settings import resolve_sampling
    from .sensitivity import Calibration, capture_calibration, sensitivity_scan

    budget = float(preset.error_budget)  # type: ignore[arg-type]
    cached = _scan_cache(pipe.transformer, preset.quantization, budget)
    if cached.is_file():
        report = json.loads(cached.read_text())
        quantize_module(pipe.transformer, preset.quantization, skip=report["kept"])
        return report["kept"], report
    prompts = list(CALIBRATION_PROMPTS)
    schedule, steps, guidance = resolve_sampling(pipe, model, None, None)
    if steps > CALIBRATION_MAX_STEPS:  # a many-step teacher: a shorter run visits the same range of t
        schedule, _, guidance = resolve_sampling(pipe, model, CALIBRATION_MAX_STEPS, None)
    calib = capture_calibration(pipe, prompts, schedule, guidance=guidance, encoder=encoder, max_calls=3)
    target = pipe.transformer
    if target.device.type == "cpu" and target.dtype != torch.float32:
        # CPUs without native bf16/fp16 run 16-bit matmuls several times slower: scan an fp32 copy
        target = copy.deepcopy(pipe.transformer).float()
        calib = Calibration([{k: (v.float() if v.is_floating_point() else v) for k, v in kw.items()}
                             for kw in calib.calls])
    result = sensitivity_scan(target, preset.quantization, calib, budget, progress=progress).to_dict()
    if target is not pipe.transformer:
        del target
        quantize_module(pipe.transformer, preset.quantization, skip=result["kept"])
    try:
        atomic_write_json(cached, result)
    except OSError:
        pass  # the scan result is a convenience cache; the model is already quantized
    return result["kept"], result


def _apply_onnx(pipe, preset: Preset):
    try:
        from ..export.onnx_runtime import apply_onnx_backend
    except ImportError:
        raise UserError("the onnx backend is not installed in this build; use a torch preset "
                        "(see `sd35flash presets`)") from None
    return apply_onnx_backend(pipe, cache_root() / "onnx", int8=True)


def load_deployed(model: str, preset: Preset, device: str | torch.device | None = None, revision: str | None = None,
                  quantized_transformer: str | Path | None = None, quantized_t5: str | Path | None = None,
                  embed_cache: bool | str | Path | None = None, force_no_t5: bool = False,
                  progress: bool = True) -> DeployedPipeline:
    """Load ``model`` and apply ``preset`` (see the module docstring).

    ``embed_cache``: ``None`` follows the preset, ``False`` disables the disk cache, a path uses it.
    ``force_no_t5`` runs without T5 whatever the preset says (``--no-t5``).
    """
    from ...models.pipeline_io import load_pipeline

    dev = resolve_device(device)
    check_runnable(preset, dev)
    use_t5 = preset.use_t5 and not force_no_t5
    overrides: dict = {}
    if not use_t5:
        overrides["text_encoder_3"] = None
    qinfo = None
    if quantized_transformer is not None:
        qinfo = read_quant_info(quantized_transformer)
        if qinfo["method"] != preset.quantization:
            raise UserError(f"{quantized_transformer} holds a {qinfo['method']} transformer, "
                            f"but preset {preset.name} uses {preset.quantization}")
        overrides["transformer"] = load_quantized(quantized_transformer, dev)
    if quantized_t5 is not None and use_t5:
        overrides["text_encoder_3"] = load_quantized(quantized_t5, dev)
    if embed_cache is None:
        cache_dir = default_cache_dir() if preset.embed_cache else None
    else:
        cache_dir = None if embed_cache is False else Path(embed_cache)  # type: ignore[arg-type]
    if cache_dir is not None:
        check_writable(cache_dir)  # before the (long) load
    pipe = load_pipeline(model, revision=revision, torch_dtype=preset.dtype, device=dev, **overrides)
    pipe.set_progress_bar_config(disable=True)
    variant = f"t5={preset.t5 if use_t5 else 'off'};backend={preset.backend}"
    encoder = PromptEncoder(pipe, use_t5=use_t5, cache_dir=cache_dir, free_after_encoding=preset.free_encoders,
                            device=dev, variant=variant)
    if use_t5 and preset.t5 == "int8" and quantized_t5 is None:
        quantize_t5(pipe, "int8-weight")

    quantized: list[str] = []
    kept: list[str] = []
    report = None
    if qinfo is not None:
        kept = list(qinfo.get("kept", []))
        report = qinfo.get("sensitivity")
    elif get_method(preset.quantization).library:
        if preset.error_budget is not None:
            kept, report = _mixed_precision(pipe, model, preset, encoder, progress)
        else:
            quantize_module(pipe.transformer, preset.quantization)
    if get_method(preset.quantization).library:
        from .quantize import linear_names

        quantized = [n for n in linear_names(pipe.transformer) if n not in set(kept)]
    if preset.backend == "onnx":
        pipe = _apply_onnx(pipe, preset)
        encoder.pipe = pipe
    return DeployedPipeline(pipe, preset, encoder, preset_size(pipe, preset), quantized, kept, report)
