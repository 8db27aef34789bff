"""Memory arithmetic of SD3 pipelines, shared by the inference planner (``deploy/tools/plan.py``,
`sd35flash plan`) and the training planner (:mod:`sd35flash.plan.train`, `plan --train`).

1. **Exact parameter counts.** The five networks (SD3 transformer, CLIP-L, CLIP-G, T5, VAE) are
   instantiated with their real classes on the meta device -- from the published SD3.5 Medium/Large
   architectures in ``configs/sd35-{medium,large}-architecture.yaml`` or from a pipeline folder's
   ``*/config.json`` -- and every parameter and buffer is classified as a linear-layer weight, an
   embedding table or "other" (biases, norms, convolutions, position embeddings).
2. **Bytes per parameter** of a :class:`WeightFormat` (bits of linear weights, quantisation scales,
   bytes of everything else).
3. **Activations** per resolution: the formulas in :func:`transformer_activation_elements`,
   :func:`vae_decode_activation_elements` and :func:`text_encoder_activation_elements`, counted in
   the live tensors of diffusers' / transformers' forward passes at inference (no autograd).

Nothing here knows the device presets; it imports no other part of sd35flash but ``errors``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sd35flash.config import load_config
from sd35flash.errors import UserError

__all__ = [
    "GIB",
    "Architecture",
    "ParamStats",
    "WeightFormat",
    "build_on_meta",
    "load_architecture",
    "param_stats",
    "text_encoder_activation_elements",
    "transformer_activation_elements",
    "vae_decode_activation_elements",
]

GIB = 2**30
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BUILT_IN = {"sd35-medium": "sd35-medium-architecture.yaml", "sd35-large": "sd35-large-architecture.yaml"}
# planner component name -> pipeline attribute
COMPONENTS = {"transformer": "transformer", "clip_l": "text_encoder", "clip_g": "text_encoder_2",
              "t5": "text_encoder_3", "vae": "vae"}


# ----------------------------------------------------------------------------- weight formats


@dataclass(frozen=True)
class WeightFormat:
    """How one component's weights are stored.

    ``linear_bits``: bits per element of ``nn.Linear`` weight matrices (16, 32, or a quantised 8/6/4).
    ``other_bytes``: bytes per element of every other floating parameter or buffer.
    ``group_size``: quantisation scales -- ``None`` one per output row (torchao int8 weight-only),
    ``0`` one per tensor (onnxruntime dynamic), ``g`` one per ``g`` weights; ``scale_bytes`` each.
    ``embeddings``: whether embedding tables are quantised like linear weights (onnxruntime
    quantises ``Gather``; torchao's linear filter does not).
    """

    name: str
    linear_bits: int
    other_bytes: int
    group_size: int | None = None
    scale_bytes: int = 0
    embeddings: bool = False

    @property
    def quantized(self) -> bool:
        return self.linear_bits < 16


BF16 = WeightFormat("bf16", 16, 2)
FP32 = WeightFormat("fp32", 32, 4)
FP16 = WeightFormat("fp16", 16, 2)
INT8_WEIGHT_ONLY = WeightFormat("int8 weight-only, per-row bf16 scales", 8, 2, None, 2)
INT6_GROUP32 = WeightFormat("int6 packed, bf16 scale per 32 weights", 6, 2, 32, 2)
INT4_GROUP32 = WeightFormat("int4 packed, bf16 scale per 32 weights", 4, 2, 32, 2)
QINT4_GROUP128 = WeightFormat("quanto qint4 packed, bf16 scale and shift per 128 weights", 4, 2, 128, 4)
FP8_ROWWISE = WeightFormat("fp8 e4m3, per-row fp32 scales", 8, 2, None, 4)
ORT_INT8 = WeightFormat("onnxruntime int8 dynamic, per-tensor scale", 8, 4, 0, 5, embeddings=True)



# ----------------------------------------------------------------------------- architectures


@dataclass
class Architecture:
    """The networks of one SD3 pipeline: constructor configs (``None`` for an absent T5) and the
    text lengths the sampler pads to."""

    name: str
    configs: dict[str, dict[str, Any] | None]
    clip_tokens: int = 77
    t5_tokens: int = 256


@dataclass
class TextTokens:
    """The text lengths the sampler pads to: CLIP's, and T5's (the pipeline's ``max_sequence_length``)."""

    clip: int = 77
    t5: int = 256


@dataclass
class ArchitectureFile:
    """An architecture YAML (``configs/sd35-*-architecture.yaml``): each network's constructor
    arguments, read strictly by :func:`sd35flash.config.load_config`."""

    name: str = ""
    text_tokens: TextTokens = field(default_factory=TextTokens)
    transformer: dict[str, Any] | None = None
    text_encoder: dict[str, Any] | None = None
    text_encoder_2: dict[str, Any] | None = None
    text_encoder_3: dict[str, Any] | None = None
    vae: dict[str, Any] | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path} ({exc})") from exc


def load_architecture(config: str | os.PathLike[str]) -> Architecture:
    """``sd35-medium`` / ``sd35-large`` (built in), an architecture YAML, or an SD3 pipeline folder."""
    text = os.fspath(config)
    path = CONFIG_DIR / BUILT_IN[text] if text in BUILT_IN else Path(text).expanduser()
    if path.is_file():
        f = load_config(ArchitectureFile, path)
        return Architecture(f.name or path.stem, {k: getattr(f, k) for k in COMPONENTS.values()},
                            f.text_tokens.clip, f.text_tokens.t5)
    if path.is_dir():
        return _architecture_from_folder(path)
    raise UserError(f"--config {text}: not one of {sorted(BUILT_IN)}, an architecture YAML or an SD3 pipeline folder")


def _architecture_from_folder(folder: Path) -> Architecture:
    configs: dict[str, dict[str, Any] | None] = {}
    for attr in COMPONENTS.values():
        cfg = folder / attr / "config.json"
        if cfg.is_file():
            configs[attr] = {k: v for k, v in _read_json(cfg).items() if not k.startswith("_")}
        elif attr == "text_encoder_3":
            configs[attr] = None  # a pipeline without T5
        else:
            raise UserError(f"{folder} has no {attr}/config.json; pass an SD3 pipeline folder")

    def max_len(sub: str, default: int) -> int:
        tok = folder / sub / "tokenizer_config.json"
        n = _read_json(tok).get("model_max_length", default) if tok.is_file() else default
        return int(min(n, 512)) if isinstance(n, (int, float)) else default

    # the lengths sd35flash.sampling pads to (clip_length / t5_length)
    return Architecture(folder.name, configs, max_len("tokenizer", 77), max_len("tokenizer_3", 256))


def build_on_meta(arch: Architecture) -> dict[str, torch.nn.Module | None]:
    """Each network of ``arch`` built with its real class on the meta device (no memory, no init)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def drop(cfg: dict[str, Any], *keys: str) -> dict[str, Any]:
        return {k: v for k, v in cfg.items() if k not in keys}

    out: dict[str, torch.nn.Module | None] = {}
    with torch.device("meta"):
        c = arch.configs
        out["transformer"] = SD3Transformer2DModel.from_config(c["transformer"])
        out["clip_l"] = CLIPTextModelWithProjection(CLIPTextConfig(**drop(c["text_encoder"], "architectures")))
        out["clip_g"] = CLIPTextModelWithProjection(CLIPTextConfig(**drop(c["text_encoder_2"], "architectures")))
        t5 = c.get("text_encoder_3")
        out["t5"] = T5EncoderModel(T5Config(**drop(t5, "architectures"))) if t5 else None
        out["vae"] = AutoencoderKL.from_config(c["vae"])
    return out


# ----------------------------------------------------------------------------- parameter statistics


@dataclass
class ParamStats:
    """Element counts of one network, by how quantisation treats them (shared tensors counted once)."""

    params: int = 0            # elements of nn.Parameter tensors
    buffers: int = 0           # elements of buffers (e.g. SD3's position-embedding table)
    linear: int = 0            # elements of nn.Linear weights
    linear_rows: int = 0       # their output rows (per-row scales)
    linear_tensors: int = 0
    embedding: int = 0         # elements of nn.Embedding tables
    embedding_rows: int = 0
    embedding_tensors: int = 0
    other_float: int = 0       # every other floating element (biases, norms, convs, buffers)
    other_int_bytes: int = 0   # integer buffers, kept as they are (position ids)

    def weight_bytes(self, fmt: WeightFormat) -> int:
        """Bytes of the weights stored as ``fmt``:
        ``linear * bits / 8 + scales + other_float * other_bytes + int buffers``, embeddings counted
        as linear weights when ``fmt.embeddings`` (else as ``other``)."""
        quant_elems, rows, tensors = self.linear, self.linear_rows, self.linear_tensors
        other = self.other_float
        if fmt.embeddings:
            quant_elems, rows = quant_elems + self.embedding, rows + self.embedding_rows
            tensors = tensors + self.embedding_tensors
        else:
            other += self.embedding
        if fmt.linear_bits >= 16:  # unquantised: linear weights stored like everything else
            return (quant_elems + other) * fmt.other_bytes + self.other_int_bytes
        if fmt.group_size is None:
            scales = rows
        elif fmt.group_size == 0:
            scales = tensors
        else:
            scales = math.ceil(quant_elems / fmt.group_size)
        return math.ceil(quant_elems * fmt.linear_bits / 8) + scales * fmt.scale_bytes + other * fmt.other_bytes \
            + self.other_int_bytes


def param_stats(module: torch.nn.Module) -> ParamStats:
    """Classify every parameter and buffer of ``module`` (works on meta tensors)."""
    s = ParamStats()
    seen: set[int] = set()
    for mod in module.modules():
        for kind, tensors in (("param", mod._parameters), ("buffer", mod._buffers)):
            for name, t in tensors.items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                n = t.numel()
                if kind == "param":
                    s.params += n
                else:
                    s.buffers += n
                if not t.is_floating_point():
                    s.other_int_bytes += n * t.element_size()
                elif kind == "param" and name == "weight" and isinstance(mod, torch.nn.Linear):
                    s.linear += n
                    s.linear_rows += t.shape[0]
                    s.linear_tensors += 1
                elif kind == "param" and name == "weight" and isinstance(mod, torch.nn.Embedding):
                    s.embedding += n
                    s.embedding_rows += t.shape[0]
                    s.embedding_tensors += 1
                else:
                    s.other_float += n
    return s


# ----------------------------------------------------------------------------- activations


def transformer_activation_elements(cfg: dict[str, Any], resolution: int, text_tokens: int, batch: int,
                                    vae_scale: int = 8) -> int:
    """Peak live activation elements of one SD3 transformer forward at inference (no autograd).

    Tokens: ``N_i = (resolution / vae_scale / patch)^2`` image tokens, ``N_t`` text tokens (77 CLIP +
    the T5 length), ``N = N_i + N_t``; width ``D = heads * head_dim``; the MLP is ``4 D`` wide;
    ``dual`` = 1 for a dual-attention block (SD3.5 Medium's first 13), else 0. The peak of a block is
    the larger of two moments, per sample:

    * joint attention: ``9 N D + dual N_i D`` -- both streams' block inputs (still held by the
      caller) and normalised inputs (``2 N D``; a dual block's second normalised image input adds
      ``N_i D``), per-stream q, k, v (``3 N D``), their concatenation along the sequence (``3 N D``)
      and the attention output (``N D``);
    * MLP: ``(13 + dual) N_i D + 3 N_t D`` -- image: the block input and the residual after
      attention (``2``), the modulated normalised input (``1``), the gated attention output the block
      still holds (``1``; a dual block also holds its second attention output and normalised input,
      ``2``), the ``4 D`` hidden before and after GELU (``8``); text: its block input, normalised
      input and attention output (``3``). That is ``12 + 2 dual`` for a full block; the last block
      (``context_pre_only``) has no text output projection, so its text attention output is a view
      that keeps the whole ``N D`` attention output alive: ``13 N_i D + 3 N_t D``. The larger of the
      two is ``(13 + dual) N_i D + 3 N_t D``.

    Plus the inputs: latents ``C (resolution / vae_scale)^2`` and text states ``N_t * joint_dim``.
    ``batch`` counts samples per forward (2 per image with classifier-free guidance). The fused
    attention (``scaled_dot_product_attention``) keeps no ``N x N`` matrix. At SD3.5 sizes the MLP
    moment dominates (Medium at 1024 px: 0.17 GiB in bf16). Checked against
    ``torch.distributed._tools.mem_tracker.MemTracker`` (``python -m sd35flash.deploy.tools.plan_check``).
    """
    side = resolution // vae_scale
    n_img = (side // cfg["patch_size"]) ** 2
    n_txt = text_tokens
    n = n_img + n_txt
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    dual = 1 if cfg.get("dual_attention_layers") else 0
    attention = 9 * n * d + dual * n_img * d
    mlp = (13 + dual) * n_img * d + 3 * n_txt * d
    inputs = cfg["in_channels"] * side * side + n_txt * cfg["joint_attention_dim"]
    return batch * (max(attention, mlp) + inputs)


def vae_decode_activation_elements(cfg: dict[str, Any], resolution: int, batch: int) -> int:
    """Peak live activation elements of ``AutoencoderKL.decode`` at inference.

    The decoder's up blocks run from the coarsest grid to full resolution; block ``i`` works at side
    ``s_i`` and its first ResNet block receives ``C_in`` channels (the previous block's width). That
    ResNet keeps its input (for the shortcut) while GroupNorm and SiLU each make a new tensor of the
    same size, so its peak is ``3 * C_in * s_i^2``. The last up block dominates: at SD3's
    ``[128, 256, 512, 512]`` it is ``3 * 256 * resolution^2`` (1.5 GiB in bf16 at 1024 px). The
    mid-block attention is fused (no ``s^2 x s^2`` matrix) and much smaller.
    """
    widths = list(cfg["block_out_channels"])
    rev = widths[::-1]
    side = resolution // (2 ** (len(widths) - 1))
    peak = 0
    c_in = rev[0]
    for i, c_out in enumerate(rev):
        peak = max(peak, 3 * c_in * side * side, 3 * c_out * side * side)
        c_in = c_out
        if i < len(rev) - 1:
            side *= 2
    return batch * peak


def text_encoder_activation_elements(kind: str, cfg: dict[str, Any], tokens: int, batch: int) -> int:
    """Peak live activation elements of one text encoder forward (``kind`` = ``clip`` or ``t5``).

    Per layer: the hidden state and its normalised copy, q, k, v and the attention output
    (``6 L d``); the attention scores and softmax (``2 H L^2``; T5 also keeps its position bias,
    ``H L^2``); the MLP hidden (``2 L f``, T5's gated MLP ``4 L f``). CLIP returns every layer's
    hidden state to the pipeline, which takes the penultimate one: ``(layers + 1) L d`` more.
    """
    if kind == "clip":
        d, f = cfg["hidden_size"], cfg["intermediate_size"]
        h, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
        per = 6 * tokens * d + 2 * h * tokens**2 + 2 * tokens * f
        return batch * (per + (layers + 1) * tokens * d)
    d, f, h = cfg["d_model"], cfg["d_ff"], cfg["num_heads"]
    return batch * (6 * tokens * d + 3 * h * tokens**2 + 4 * tokens * f)


# ----------------------------------------------------------------------------- cached statistics


@functools.lru_cache(maxsize=8)
def component_stats(configs_json: str) -> dict[str, ParamStats | None]:
    arch = Architecture("cached", json.loads(configs_json))
    return {name: (param_stats(m) if m is not None else None) for name, m in build_on_meta(arch).items()}
