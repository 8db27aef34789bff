"""Run exported ONNX graphs with onnxruntime, as drop-in replacements inside an SD3 pipeline.

The wrappers are ``torch.nn.Module`` subclasses with no parameters that answer the calls the
project's sampler (:mod:`sd35flash.sampling`) and diffusers' ``StableDiffusion3Pipeline`` make:

* :class:`OrtTransformer` -- ``transformer(hidden_states=, timestep=, encoder_hidden_states=,
  pooled_projections=, return_dict=False)[0]`` (``predict_velocity``), with ``.config`` and ``.dtype``;
* :class:`OrtVaeDecoder` -- ``vae.decode(z, return_dict=False)[0]`` and ``vae.config``
  (``decode_latents``); it has no encoder;
* :class:`OrtClipTextEncoder` -- ``text_encoder(ids, output_hidden_states=True)`` whose ``[0]`` is the
  pooled projection and ``.hidden_states[-2]`` the penultimate layer (``encode_prompt``);
* :class:`OrtT5Encoder` -- ``text_encoder_3(ids)[0]``.

Inputs may live on any device; they are handed to onnxruntime as float32 / int64 host arrays and
the outputs come back on the input's device and dtype. :func:`apply_onnx_backend` swaps them into a
pipeline, exporting first (or reusing a cached export keyed by the weights' fingerprint).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict

from sd35flash.checksums import verify_checksums
from sd35flash.deploy.export.onnx_export import (
    GRAPHS,
    MANIFEST,
    _export_settings,
    ensure_writable_dir,
    export_onnx,
    pipeline_fingerprint,
    quantize_export,
    read_manifest,
)
from sd35flash.errors import UserError

__all__ = [
    "OrtClipTextEncoder",
    "OrtModel",
    "OrtT5Encoder",
    "OrtTransformer",
    "OrtVaeDecoder",
    "apply_onnx_backend",
    "cached_export",
    "load_onnx_modules",
    "default_providers",
]


def default_providers() -> list[str]:
    """CUDA when both torch and onnxruntime can use it, else the CPU provider."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if torch.cuda.is_available() and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtModel(torch.nn.Module):
    """One onnxruntime ``InferenceSession`` behind a parameter-free ``nn.Module``.

    ``dtype`` is float32 (what the graph computes in) and ``device`` is the CPU (where its inputs are
    staged). Static input dimensions of the graph are checked before running, so a wrong latent size
    is a one-line error rather than an onnxruntime trace.
    """

    is_onnx = True

    def __init__(self, path: str | os.PathLike[str], info: dict[str, Any], providers: list[str] | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                            providers=providers or default_providers())
        self.config = FrozenDict(info.get("config", {}))
        self.int8 = bool(info.get("int8", False))
        self.file_bytes = int(info.get("bytes", 0))  # the graph's files (.onnx + external data) on disk
        self._inputs = [(i.name, i.shape) for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def extra_repr(self) -> str:
        return f"{self.path.name}{' int8' if self.int8 else ''}, providers={self.session.get_providers()}"

    def run(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Run the graph on ``tensors`` (in input order); float32/int64 CPU tensors come back."""
        if len(tensors) != len(self._inputs):
            raise ValueError(f"{self.path.name} takes {len(self._inputs)} inputs, got {len(tensors)}")
        feeds = {}
        for (name, shape), t in zip(self._inputs, tensors):
            for axis, (want, got) in enumerate(zip(shape, t.shape)):
                if isinstance(want, int) and want != got:
                    raise UserError(
                        f"the ONNX {self.path.stem} was exported with {name} of shape {shape}, got {tuple(t.shape)} "
                        f"(axis {axis}); export again with the size you need (`sd35flash export --resolution`)"
                    )
            t = t.detach().to("cpu")
            t = t.to(torch.int64) if not torch.is_floating_point(t) else t.to(torch.float32)
            feeds[name] = np.ascontiguousarray(t.numpy())
        return [torch.from_numpy(o) for o in self.session.run(None, feeds)]


class OrtTransformer(OrtModel):
    """The SD3 transformer: ``(hidden_states, timestep, encoder_hidden_states, pooled_projections) -> v``."""

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, joint_attention_kwargs: dict | None = None, return_dict: bool = True,
                **unused: Any):
        if joint_attention_kwargs:
            raise ValueError("the ONNX transformer does not take joint_attention_kwargs (LoRA scale, IP adapters)")
        t = timestep if isinstance(timestep, torch.Tensor) else torch.tensor(float(timestep))
        if t.ndim == 0:
            t = t.expand(hidden_states.shape[0])
        (v,) = self.run(hidden_states, t, encoder_hidden_states, pooled_projections)
        v = v.to(device=hidden_states.device, dtype=hidden_states.dtype)
        if not return_dict:
            return (v,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=v)


class OrtVaeDecoder(OrtModel):
    """The VAE decoder; ``decode(z)`` expects latents already mapped by ``z / scaling + shift``."""

    def decode(self, z: torch.Tensor, return_dict: bool = True, **unused: Any):
        (img,) = self.run(z)
        img = img.to(device=z.device, dtype=z.dtype)
        if not return_dict:
            return (img,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=img)

    def encode(self, *args: Any, **kwargs: Any):
        raise UserError("the ONNX backend exports only the VAE decoder; encode images with the PyTorch VAE")

    def forward(self, z: torch.Tensor, return_dict: bool = True):
        return self.decode(z, return_dict=return_dict)


class OrtClipTextEncoder(OrtModel):
    """CLIP text encoder with projection: outputs ``text_embeds``, ``last_hidden_state`` and every
    layer's hidden state (as ``CLIPTextModelWithProjection(..., output_hidden_states=True)``)."""

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False, return_dict: bool = True,
                **unused: Any):
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        embeds, last, *hidden = self.run(input_ids)
        device = input_ids.device
        out = CLIPTextModelOutput(text_embeds=embeds.to(device), last_hidden_state=last.to(device),
                                  hidden_states=tuple(h.to(device) for h in hidden) if output_hidden_states else None)
        return out if return_dict else out.to_tuple()


class OrtT5Encoder(OrtModel):
    """T5 encoder: ``input_ids -> last_hidden_state``."""

    def forward(self, input_ids: torch.Tensor, return_dict: bool = True, **unused: Any):
        from transformers.modeling_outputs import BaseModelOutput

        (last,) = self.run(input_ids)
        out = BaseModelOutput(last_hidden_state=last.to(input_ids.device))
        return out if return_dict else out.to_tuple()


_WRAPPERS: dict[str, type[OrtModel]] = {
    "transformer": OrtTransformer,
    "vae_decoder": OrtVaeDecoder,
    "text_encoder": OrtClipTextEncoder,
    "text_encoder_2": OrtClipTextEncoder,
    "text_encoder_3": OrtT5Encoder,
}


def load_onnx_modules(export_dir: str | os.PathLike[str], providers: list[str] | None = None,
                      parts: tuple[str, ...] | None = None) -> dict[str, OrtModel]:
    """onnxruntime wrappers for an export folder, keyed by the pipeline attribute each replaces
    (``transformer``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``)."""
    folder = Path(export_dir).expanduser()
    manifest = read_manifest(folder)
    verify_checksums(folder)
    out: dict[str, OrtModel] = {}
    for graph, info in manifest["graphs"].items():
        attr = GRAPHS[graph]
        if parts is not None and attr not in parts:
            continue
        out[attr] = _WRAPPERS[graph](folder / info["file"], info, providers=providers)
    return out


def cached_export(pipe, cache_dir: str | os.PathLike[str], int8: bool, resolution: int | None = None,
                  progress: bool = True) -> Path:
    """The folder of ``pipe``'s ONNX export in ``cache_dir``: ``<fingerprint>-fp32`` or ``-int8``.

    Exported on first use; the int8 entry is quantised from the float32 one (which is kept, so both
    are cached). The fingerprint covers every weight and the export settings, so a changed model gets
    a new entry and an unchanged one is never exported twice.
    """
    root = ensure_writable_dir(cache_dir, "ONNX cache directory")
    key = pipeline_fingerprint(pipe, _export_settings(pipe, resolution))
    fp32 = root / f"{key}-fp32"
    if not (fp32 / MANIFEST).is_file():
        export_onnx(pipe, fp32, int8=False, resolution=resolution, progress=progress)
    if not int8:
        return fp32
    q = root / f"{key}-int8"
    if not (q / MANIFEST).is_file():
        quantize_export(fp32, q, progress=progress)
    return q


def apply_onnx_backend(pipe, cache_dir: str | os.PathLike[str], int8: bool, resolution: int | None = None,
                       parts: tuple[str, ...] | None = None, providers: list[str] | None = None,
                       progress: bool = True):
    """Swap ``pipe``'s transformer, VAE (decoder) and text encoders for onnxruntime-backed wrappers.

    Exports to (or reuses) ``cache_dir/<fingerprint>-{fp32,int8}`` (see :func:`cached_export`);
    ``parts`` limits the swap to some pipeline attributes (e.g. ``("transformer",)``). The PyTorch
    modules are released, so memory holds the ONNX weights only. Returns ``pipe``.
    """
    folder = cached_export(pipe, cache_dir, int8=int8, resolution=resolution, progress=progress)
    for attr, module in load_onnx_modules(folder, providers=providers, parts=parts).items():
        setattr(pipe, attr, module)
    return pipe
