"""Our sampler reproduces the stock diffusers StableDiffusion3Pipeline."""

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline

from sd35flash.sampling import (
    PromptEmbeds,
    decode_latents,
    encode_prompts,
    generate,
    latent_shape,
    make_noise,
    sample_latents,
    scheduler_schedule,
)


def test_sampler_matches_stock_pipeline(smoke_teacher):
    pipe = StableDiffusion3Pipeline.from_pretrained(smoke_teacher)
    prompt, seed = "two small blue squares", 11
    for guidance, steps in ((1.0, 4), (4.0, 6)):
        kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                  generator=torch.Generator().manual_seed(seed), max_sequence_length=pipe.tokenizer_3.model_max_length)
        ref_lat = pipe(prompt, output_type="latent", **kw).images
        cond = encode_prompts(pipe, [prompt])
        uncond = encode_prompts(pipe, [""]) if guidance > 1 else None
        noise = make_noise(latent_shape(pipe, 64, 64), [seed])
        ours = sample_latents(pipe.transformer, noise, scheduler_schedule(pipe, steps), cond, uncond, guidance)
        assert torch.allclose(ours, ref_lat, atol=1e-4, rtol=1e-4)
        # decoding matches the pipeline's image post-processing
        kw["generator"] = torch.Generator().manual_seed(seed)
        ref_img = (pipe(prompt, output_type="np", **kw).images[0] * 255).round().astype(np.uint8)
        assert np.abs(decode_latents(pipe.vae, ours)[0].astype(int) - ref_img.astype(int)).max() <= 1
        # the batched front end gives the same image as one at a time
        both = generate(pipe, [prompt, "a red circle"], [seed, 5], scheduler_schedule(pipe, steps), guidance=guidance)
        assert np.abs(both[0].astype(int) - ref_img.astype(int)).mean() < 0.5


def test_no_t5_equals_pipeline_without_t5(smoke_teacher):
    pipe = StableDiffusion3Pipeline.from_pretrained(smoke_teacher)
    with_t5 = encode_prompts(pipe, ["a red circle"])
    without = encode_prompts(pipe, ["a red circle"], use_t5=False)
    L = pipe.tokenizer.model_max_length
    assert torch.equal(with_t5.embeds[:, :L], without.embeds[:, :L])
    assert without.embeds[:, L:].abs().max() == 0
    assert with_t5.embeds[:, L:].abs().max() > 0
    assert pipe.text_encoder_3 is not None  # restored
    assert isinstance(without, PromptEmbeds)


def test_encoding_without_t5_keeps_t5_in_the_pipeline_config(smoke_teacher):
    pipe = StableDiffusion3Pipeline.from_pretrained(smoke_teacher)
    before = pipe.config["text_encoder_3"]
    encode_prompts(pipe, ["a red circle"], use_t5=False)
    assert pipe.config["text_encoder_3"] == before and before[0] is not None
    assert pipe.text_encoder_3 is not None
