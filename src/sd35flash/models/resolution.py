"""Image resolution against an SD3 pipeline's geometry: VAE downsampling, patch size, position table."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = ["geometry_configs", "latent_side"]


def geometry_configs(model: str, revision: str | None = None) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """The ``transformer`` and ``vae`` configs of a pipeline folder or hub id, without loading weights."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from .pipeline_io import _check_pipeline_folder, is_local_path

    if is_local_path(model):
        _check_pipeline_folder(Path(model).expanduser(), str(model))
    try:
        tr = SD3Transformer2DModel.load_config(model, subfolder="transformer", revision=revision)
        vae = AutoencoderKL.load_config(model, subfolder="vae", revision=revision)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the transformer / vae configs of {model} ({type(e).__name__}); "
                        "pass an SD3 pipeline folder or hub id") from None
    return tr, vae


def latent_side(transformer_config: Mapping[str, Any], vae_config: Mapping[str, Any], resolution: int | None) -> int:
    """The latent side for a square image of ``resolution`` pixels (``None``: the transformer's own).

    With ``scale = 2 ** (len(vae.block_out_channels) - 1)`` (8 for SD3), the side
    ``h = resolution / scale`` must be a whole number of patches and at most
    ``pos_embed_max_size * patch_size``, the position table SD3 crops from. SD3.5 Medium and Large
    are trained at 512 and 1024 px; the toy teacher at 64.
    """
    if resolution is None:
        return int(transformer_config["sample_size"])
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    patch = int(transformer_config["patch_size"])
    unit = scale * patch
    if resolution < unit or resolution % unit:
        raise UserError(f"--resolution {resolution} must be a positive multiple of {unit} px for this model "
                        f"(VAE x{scale}, patch {patch})")
    table = transformer_config.get("pos_embed_max_size") or int(transformer_config["sample_size"]) // patch
    limit = int(table) * patch * scale
    if resolution > limit:
        raise UserError(f"--resolution {resolution} is larger than this model's position table allows "
                        f"({limit} px = pos_embed_max_size {table} x patch {patch} x VAE {scale}); "
                        f"use at most {limit}")
    return resolution // scale
