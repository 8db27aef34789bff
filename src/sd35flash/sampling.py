"""Prompt encoding and flow-matching Euler sampling with CFG for SD3 pipelines.

The sampler reproduces ``StableDiffusion3Pipeline.__call__`` (same prompt encoding, same noise for
the same seed, same Euler updates ``x_s = x_t + (s - t) * v``, same decoding) but takes an explicit
timestep schedule, which few-step students need, and optionally routes each step to a different
transformer (split-timestep branches). ``tests/test_sampling.py`` checks the equality.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import flow
from .errors import NonFiniteError, UserError


@dataclass
class PromptEmbeds:
    """Text conditioning for the SD3 transformer: per-token ``embeds`` (B, L, D) and ``pooled`` (B, P)."""

    embeds: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx: slice | torch.Tensor) -> PromptEmbeds:
        return PromptEmbeds(self.embeds[idx], self.pooled[idx])

    def to(self, *args, **kwargs) -> PromptEmbeds:
        return PromptEmbeds(self.embeds.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    @staticmethod
    def cat(parts: Sequence[PromptEmbeds]) -> PromptEmbeds:
        return PromptEmbeds(torch.cat([p.embeds for p in parts]), torch.cat([p.pooled for p in parts]))


def t5_length(pipe) -> int:
    """Number of T5 tokens the pipeline uses: the T5 tokenizer's ``model_max_length`` (capped at 512)."""
    tok = getattr(pipe, "tokenizer_3", None)
    n = getattr(tok, "model_max_length", 256) if tok is not None else 256
    return int(min(n, 512))


def clip_length(pipe) -> int:
    return int(pipe.tokenizer.model_max_length)


def encode_prompts(pipe, prompts: Sequence[str], use_t5: bool = True,
                   device: torch.device | str | None = None) -> PromptEmbeds:
    """Encode prompts exactly as ``StableDiffusion3Pipeline.encode_prompt`` does (no CFG batch).

    Layout (SD3): ``[CLIP-L ++ CLIP-G penultimate hidden states, zero-padded to the T5 width]``
    followed along the sequence by the T5 states; ``pooled = [CLIP-L pooled ++ CLIP-G pooled]``.
    With ``use_t5=False`` (or no T5 loaded) the T5 block is zeros, as SD3 was trained with
    independent encoder dropout.
    """
    if any(not isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be strings")
    device = device or pipe._execution_device
    t5 = pipe.text_encoder_3
    if not use_t5:
        # object.__setattr__: diffusers' pipeline __setattr__ would also rewrite the registered
        # component in the config, and a pipeline saved afterwards would lose its T5.
        object.__setattr__(pipe, "text_encoder_3", None)
    try:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=t5_length(pipe),
        )
    finally:
        object.__setattr__(pipe, "text_encoder_3", t5)
    return PromptEmbeds(embeds, pooled)


def drop_encoders(pe: PromptEmbeds, clip_len: int, drop_clip: torch.Tensor, drop_t5: torch.Tensor) -> PromptEmbeds:
    """Independent text-encoder dropout (SD3): zero the CLIP block (tokens and pooled) and/or the T5
    block per sample, where ``drop_clip`` / ``drop_t5`` are boolean (B,) masks."""
    embeds = pe.embeds.clone()
    pooled = pe.pooled.clone()
    keep_clip = (~drop_clip).to(embeds.dtype).view(-1, 1, 1)
    keep_t5 = (~drop_t5).to(embeds.dtype).view(-1, 1, 1)
    embeds = torch.cat([embeds[:, :clip_len] * keep_clip, embeds[:, clip_len:] * keep_t5], dim=1)
    pooled = pooled * keep_clip.view(-1, 1)
    return PromptEmbeds(embeds, pooled)


def predict_velocity(transformer, x: torch.Tensor, t: torch.Tensor | float, cond: PromptEmbeds) -> torch.Tensor:
    """``v(x_t, t, c)`` from a diffusers SD3 transformer (which takes ``timestep = 1000 * t``)."""
    ts = flow.model_timestep(t, x.shape[0], x.device)
    return transformer(
        hidden_states=x,
        timestep=ts,
        encoder_hidden_states=cond.embeds,
        pooled_projections=cond.pooled,
        return_dict=False,
    )[0]


def guided_velocity(transformer, x: torch.Tensor, t: torch.Tensor | float, cond: PromptEmbeds,
                    uncond: PromptEmbeds | None, guidance: float) -> torch.Tensor:
    """Velocity with classifier-free guidance (one batched pass of [uncond, cond] when ``guidance > 1``).

    ``t`` is a float or a per-sample (B,) tensor."""
    if uncond is None or guidance <= 1.0:
        return predict_velocity(transformer, x, t, cond)
    both = PromptEmbeds.cat([uncond, cond])
    tt = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.ndim == 1 else t
    v = predict_velocity(transformer, torch.cat([x, x]), tt, both)
    v_u, v_c = v.chunk(2)
    return flow.apply_cfg(v_u, v_c, guidance)


def scheduler_schedule(pipe, steps: int) -> flow.Schedule:
    """The ``steps + 1`` times the pipeline's own scheduler visits for ``num_inference_steps=steps``.

    For SD3's ``FlowMatchEulerDiscreteScheduler`` these are ``linspace(1, sigma_min, steps)`` passed
    through the shift, then 0 -- not the uniform grid of :func:`flow.sampling_schedule` (at 4 steps,
    shift 3: 1, 0.858, 0.602, 0.009, 0). Teachers sample with this so that ``generate`` reproduces
    ``StableDiffusion3Pipeline`` exactly; students carry their own schedule in ``sd35flash.json``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    return flow.Schedule(tuple(float(s) for s in sched.sigmas))


TransformerFor = Callable[[int, float], torch.nn.Module]


@torch.no_grad()
def sample_latents(
    transformer: torch.nn.Module | TransformerFor,
    noise: torch.Tensor,
    schedule: flow.Schedule | Sequence[float],
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Integrate from ``t_0`` down to 0 with Euler steps along ``schedule`` (:func:`flow.euler_sample`).

    ``transformer`` is a module or a function ``(step_index, t) -> module`` (used by unmerged
    split-timestep students).
    """

    def velocity(i: int, t: float, x: torch.Tensor) -> torch.Tensor:
        model = transformer(i, t) if not isinstance(transformer, torch.nn.Module) else transformer
        return guided_velocity(model, x, t, cond, uncond, guidance)

    return flow.euler_sample(velocity, noise, flow.Schedule.of(schedule))


def latent_shape(pipe, height: int, width: int) -> tuple[int, int, int]:
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return (pipe.transformer.config.in_channels, height // scale, width // scale)


def make_noise(shape: tuple[int, int, int], seeds: Sequence[int], dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Per-image noise: image ``i`` uses ``torch.Generator().manual_seed(seeds[i])`` on the CPU, so an
    image depends only on its own seed (the same noise the stock pipeline draws for that generator)."""
    out = [torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
           for s in seeds]
    return torch.cat(out).to(device=device, dtype=dtype)


def check_finite_output(x: torch.Tensor, what: str, model: str = "", prompts: Sequence[str] = ()) -> None:
    """Raise :class:`NonFiniteError` if ``x`` holds NaN or inf, naming the model and the first prompt
    whose sample is affected (a NaN image would otherwise be written as a black PNG)."""
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if not bool(bad.any()):
        return
    i = int(bad.nonzero()[0])
    prompt = f" for prompt {prompts[i]!r}" if i < len(prompts) else ""
    raise NonFiniteError(f"{model or 'the model'} produced non-finite {what} (NaN/inf){prompt}: its weights are "
                         "damaged or diverged, or a setting such as the guidance scale is out of range")


def pipeline_name(pipe) -> str:
    """The folder or hub id a pipeline was loaded from (empty for one built in memory)."""
    return str(getattr(pipe, "name_or_path", "") or "")


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, model: str = "", prompts: Sequence[str] = ()) -> np.ndarray:
    """Latents -> uint8 images (B, H, W, 3): ``x = vae.decode(z / scaling + shift)``, then [-1, 1] -> [0, 255].
    Non-finite latents or decoded pixels raise :class:`NonFiniteError` (``model``/``prompts`` name it)."""
    check_finite_output(latents, "latents", model, prompts)
    z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    img = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    check_finite_output(img, "images", model, prompts)
    img = (img.float() / 2 + 0.5).clamp(0, 1)
    return (img.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    schedule: flow.Schedule | Sequence[float],
    guidance: float = 1.0,
    use_t5: bool = True,
    batch_size: int = 32,
    height: int | None = None,
    width: int | None = None,
    transformer: torch.nn.Module | TransformerFor | None = None,
    progress: Callable[[int], None] | None = None,
    encoder: Callable[[Sequence[str]], PromptEmbeds] | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Generate one image per (prompt, seed) pair. Returns uint8 (N, H, W, 3).

    Non-finite latents or images raise :class:`NonFiniteError` naming the model (``name``; by default
    the folder ``pipe`` was loaded from, when its own transformer samples) and the prompt.

    ``encoder`` (prompts -> :class:`PromptEmbeds`) replaces :func:`encode_prompts`, e.g. a cached
    encoder whose text encoders were freed (``sd35flash.deploy.runtime.text_encoders``); ``use_t5`` is then
    the encoder's business."""
    if len(prompts) != len(seeds):
        raise ValueError("need one seed per prompt")
    if not math.isfinite(guidance):
        raise UserError(f"guidance must be a finite number, got {guidance}")
    size = pipe.transformer.config.sample_size * (2 ** (len(pipe.vae.config.block_out_channels) - 1))
    height, width = height or size, width or size
    device = pipe._execution_device
    dtype = pipe.transformer.dtype
    model = transformer if transformer is not None else pipe.transformer
    label = name if name is not None else (pipeline_name(pipe) if transformer is None else "")
    out = []
    uncond_cache: PromptEmbeds | None = None
    for start in range(0, len(prompts), batch_size):
        ps = list(prompts[start : start + batch_size])
        encode = encoder or (lambda p: encode_prompts(pipe, p, use_t5=use_t5, device=device))
        cond = encode(ps).to(device=device, dtype=dtype)
        uncond = None
        if guidance > 1.0:
            if uncond_cache is None:
                uncond_cache = encode([""]).to(device=device, dtype=dtype)
            uncond = PromptEmbeds(uncond_cache.embeds.expand(len(ps), -1, -1), uncond_cache.pooled.expand(len(ps), -1))
        noise = make_noise(latent_shape(pipe, height, width), seeds[start : start + batch_size], dtype=dtype,
                           device=device)
        lat = sample_latents(model, noise, schedule, cond, uncond, guidance)
        out.append(decode_latents(pipe.vae, lat, label, ps))
        if progress is not None:
            progress(len(ps))
    return np.concatenate(out)
