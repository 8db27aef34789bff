"""The toy teacher: a real SD3 pipeline with tiny configs.

Every component is the class a real SD3.5 checkpoint uses -- ``SD3Transformer2DModel``,
``AutoencoderKL``, two ``CLIPTextModelWithProjection`` + ``CLIPTokenizer``, ``T5EncoderModel`` +
``T5Tokenizer``, ``FlowMatchEulerDiscreteScheduler`` -- so the code that distils the toy on a CPU is
the code that distils SD3.5 on GPUs. Only the sizes differ.

SD3 wiring the configs must respect (checked in :func:`check_config`):

* transformer ``in_channels`` = ``out_channels`` = VAE ``latent_channels``;
* ``sample_size`` (latent side) = ``image_size / 2**(len(vae_block_out_channels) - 1)``;
* ``caption_projection_dim`` = ``num_attention_heads * attention_head_dim``;
* ``pooled_projection_dim`` = the two CLIP projection dims summed = ``2 * clip_hidden``;
* ``joint_attention_dim`` = T5 ``d_model`` >= ``2 * clip_hidden`` (the pipeline zero-pads the
  concatenated CLIP states up to the T5 width);
* ``pos_embed_max_size`` >= latent side / ``patch_size``.

Weights are initialised from ``cfg.seed`` inside a forked RNG, so building twice gives identical
weights and the caller's global RNG state is untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sd35flash.errors import UserError
from sd35flash.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer

__all__ = [
    "ToyConfig",
    "build_scheduler",
    "build_text_encoders",
    "build_toy_pipeline",
    "build_transformer",
    "build_vae",
    "check_config",
    "count_parameters",
]


@dataclass
class ToyConfig:
    """Sizes of the toy SD3 pipeline. The defaults give a ~13M-parameter transformer on 16x16x8."""

    image_size: int = 64
    latent_channels: int = 8
    vae_block_out_channels: tuple[int, ...] = (32, 64, 64)  # 3 blocks = 4x downsampling
    vae_layers_per_block: int = 1
    patch_size: int = 2
    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 64
    clip_hidden: int = 64
    clip_layers: int = 2
    clip_heads: int = 2
    t5_d_model: int = 128
    t5_layers: int = 2
    t5_heads: int = 2
    text_max_length: int = 24
    shift: float = 3.0
    qk_norm: str | None = "rms_norm"  # as SD3.5 (Medium and Large); None gives SD3's plain attention
    seed: int = 0  # weight initialisation

    def __post_init__(self) -> None:
        self.vae_block_out_channels = tuple(int(c) for c in self.vae_block_out_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side: ``2 ** (number of VAE blocks - 1)``."""
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the latent grid."""
        return self.image_size // self.vae_scale_factor

    @property
    def inner_dim(self) -> int:
        """Transformer width: ``num_attention_heads * attention_head_dim``."""
        return self.num_attention_heads * self.attention_head_dim


def check_config(cfg: ToyConfig) -> None:
    """Raise :class:`UserError` if ``cfg`` breaks an SD3 wiring constraint (see module docstring)."""
    problems = []
    if len(cfg.vae_block_out_channels) < 1:
        problems.append("vae_block_out_channels needs at least one block")
    elif cfg.image_size % cfg.vae_scale_factor:
        problems.append(f"image_size {cfg.image_size} is not divisible by the VAE factor {cfg.vae_scale_factor}")
    elif cfg.latent_size % cfg.patch_size:
        problems.append(f"latent size {cfg.latent_size} is not divisible by patch_size {cfg.patch_size}")
    if cfg.t5_d_model < 2 * cfg.clip_hidden:
        problems.append(
            f"t5_d_model ({cfg.t5_d_model}) must be at least 2 * clip_hidden ({2 * cfg.clip_hidden}), "
            "because SD3 zero-pads the two concatenated CLIP states to the T5 width"
        )
    if cfg.t5_d_model % cfg.t5_heads:
        problems.append(f"t5_d_model ({cfg.t5_d_model}) must be divisible by t5_heads ({cfg.t5_heads})")
    if cfg.clip_hidden % cfg.clip_heads:
        problems.append(f"clip_hidden ({cfg.clip_hidden}) must be divisible by clip_heads ({cfg.clip_heads})")
    if cfg.text_max_length < 3:
        problems.append(f"text_max_length ({cfg.text_max_length}) must be at least 3")
    if problems:
        raise UserError("invalid toy model config: " + "; ".join(problems))


def _norm_groups(channels: tuple[int, ...]) -> int:
    """Largest group count <= 32 that divides every VAE block width (GroupNorm needs it)."""
    g = 0
    for c in channels:
        g = math.gcd(g, c)
    return max(d for d in range(1, min(32, g) + 1) if g % d == 0)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the block with the CPU RNG seeded to ``seed``; the caller's RNG state is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_text_encoders(cfg: ToyConfig, words: list[str]) -> dict[str, Any]:
    """Two tiny CLIP text encoders with projection, a tiny T5 encoder, and their tokenizers.

    Returns a dict keyed like the pipeline's components: ``text_encoder``, ``text_encoder_2``,
    ``text_encoder_3``, ``tokenizer``, ``tokenizer_2``, ``tokenizer_3``. The CLIP configs carry the
    tokenizer's special-token ids, so pooling picks the first ``<|endoftext|>``.
    """
    check_config(cfg)
    clip_tok = build_clip_tokenizer(words, cfg.text_max_length)
    clip_tok_2 = build_clip_tokenizer(words, cfg.text_max_length)
    t5_tok = build_t5_tokenizer(words, cfg.text_max_length)

    def clip_config() -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=cfg.clip_hidden,
            intermediate_size=4 * cfg.clip_hidden,
            projection_dim=cfg.clip_hidden,
            num_hidden_layers=cfg.clip_layers,
            num_attention_heads=cfg.clip_heads,
            max_position_embeddings=cfg.text_max_length,
            hidden_act="gelu",
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )

    t5_config = T5Config(
        vocab_size=len(t5_tok),
        d_model=cfg.t5_d_model,
        d_kv=cfg.t5_d_model // cfg.t5_heads,
        d_ff=2 * cfg.t5_d_model,
        num_layers=cfg.t5_layers,
        num_heads=cfg.t5_heads,
        feed_forward_proj="gated-gelu",  # as T5 v1.1, SD3's text_encoder_3
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=t5_tok.pad_token_id,
        eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id,
    )
    with _seeded(cfg.seed + 1):
        text_encoder = CLIPTextModelWithProjection(clip_config())
        text_encoder_2 = CLIPTextModelWithProjection(clip_config())
        text_encoder_3 = T5EncoderModel(t5_config)
    for module in (text_encoder, text_encoder_2, text_encoder_3):
        module.eval()
    return {
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer": clip_tok,
        "tokenizer_2": clip_tok_2,
        "tokenizer_3": t5_tok,
    }


def build_vae(cfg: ToyConfig) -> AutoencoderKL:
    """A small SD3-style ``AutoencoderKL`` (no quant convs), ``image_size`` RGB <-> latent grid.

    ``scaling_factor`` = 1.0 and ``shift_factor`` = 0.0 until training measures the latent
    statistics and writes them into the config (the pipeline uses
    ``latents / scaling_factor + shift_factor`` before decoding).
    """
    check_config(cfg)
    n = len(cfg.vae_block_out_channels)
    with _seeded(cfg.seed + 2):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=cfg.vae_block_out_channels,
            layers_per_block=cfg.vae_layers_per_block,
            latent_channels=cfg.latent_channels,
            norm_num_groups=_norm_groups(cfg.vae_block_out_channels),
            sample_size=cfg.image_size,
            scaling_factor=1.0,
            shift_factor=0.0,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    return vae


def build_transformer(cfg: ToyConfig) -> SD3Transformer2DModel:
    """A small ``SD3Transformer2DModel`` wired to the toy VAE and text encoders."""
    check_config(cfg)
    with _seeded(cfg.seed + 3):
        transformer = SD3Transformer2DModel(
            sample_size=cfg.latent_size,
            patch_size=cfg.patch_size,
            in_channels=cfg.latent_channels,
            out_channels=cfg.latent_channels,
            num_layers=cfg.num_layers,
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
            joint_attention_dim=cfg.t5_d_model,
            caption_projection_dim=cfg.inner_dim,
            pooled_projection_dim=2 * cfg.clip_hidden,
            pos_embed_max_size=cfg.latent_size // cfg.patch_size,
            qk_norm=cfg.qk_norm,
        )
    return transformer


def build_scheduler(cfg: ToyConfig) -> FlowMatchEulerDiscreteScheduler:
    """SD3's sampler: Euler on the rectified-flow ODE, 1000 train timesteps, static ``shift``."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)


def build_toy_pipeline(cfg: ToyConfig, words: list[str]) -> StableDiffusion3Pipeline:
    """The whole untrained toy teacher as a stock ``StableDiffusion3Pipeline``."""
    check_config(cfg)
    encoders = build_text_encoders(cfg, words)
    pipe = StableDiffusion3Pipeline(
        transformer=build_transformer(cfg),
        scheduler=build_scheduler(cfg),
        vae=build_vae(cfg),
        **encoders,
    )
    return pipe


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
