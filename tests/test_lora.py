"""LoRA building blocks: one frozen base serves teacher (adapters disabled: exactly the base), student
and fake; gradients reach only the adapter in use; the fused export loads in stock diffusers and
equals the unfused student, and the adapter alone loads with ``load_lora_weights``."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from sd35flash.models.lora import AdapterView, adapter_parameters, add_adapters, fused_copy, save_adapter
from sd35flash.models.pipeline_io import load_pipeline
from sd35flash.sampling import encode_prompts, predict_velocity


@pytest.fixture(scope="module")
def setup(smoke_teacher):
    pipe = load_pipeline(smoke_teacher)
    base = copy.deepcopy(pipe.transformer).requires_grad_(False)
    shared = add_adapters(pipe.transformer, ["student", "fake"], rank=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained adapters: B away from zero, so each adapter changes the output
        for n, p in shared.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    cond = encode_prompts(pipe, ["a red circle", "a blue square"], device="cpu")
    c = pipe.transformer.config
    x = torch.randn((2, c.in_channels, c.sample_size, c.sample_size), generator=g)
    return pipe, base, shared, cond, x


def test_teacher_is_the_base_with_adapters_disabled(setup):
    pipe, base, shared, cond, x = setup
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        v_base = predict_velocity(base, x, t, cond)
        v_teacher = predict_velocity(AdapterView(shared, None), x, t, cond)
        v_student = predict_velocity(AdapterView(shared, "student"), x, t, cond)
        v_fake = predict_velocity(AdapterView(shared, "fake"), x, t, cond)
    assert torch.equal(v_teacher, v_base)
    assert not torch.allclose(v_student, v_base, atol=1e-4) and not torch.allclose(v_student, v_fake, atol=1e-4)


def test_gradients_reach_only_the_adapter_in_use(setup):
    pipe, base, shared, cond, x = setup
    assert all(not p.requires_grad for n, p in shared.named_parameters() if ".lora_" not in n)
    v = predict_velocity(AdapterView(shared, "student"), x, torch.tensor([0.9, 0.3]), cond)
    v.pow(2).mean().backward()
    student, fake = adapter_parameters(shared, "student"), adapter_parameters(shared, "fake")
    assert student and all(p.grad is not None for p in student)
    # all but the text-query projection of the last (context-pre-only) block, whose output is unused
    assert sum(float(p.grad.abs().sum()) > 0 for p in student) >= len(student) - 2
    assert all(p.grad is None for p in fake)
    assert all(p.grad is None for n, p in shared.named_parameters() if ".lora_" not in n)
    shared.zero_grad(set_to_none=True)


def test_fused_export_and_adapter_load_in_stock_diffusers(setup, smoke_teacher, tmp_path):
    pipe, base, shared, cond, x = setup
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        v_student = predict_velocity(AdapterView(shared, "student"), x, t, cond)
    fused = fused_copy(shared, "student")
    assert not any(".lora_" in n for n, _ in fused.named_parameters())
    fused.save_pretrained(tmp_path / "fused")
    from diffusers import SD3Transformer2DModel

    stock = SD3Transformer2DModel.from_pretrained(tmp_path / "fused")
    with torch.no_grad():
        assert torch.allclose(predict_velocity(stock, x, t, cond), v_student, atol=1e-5)
    save_adapter(shared, "student", tmp_path / "adapter")
    fresh = StableDiffusion3Pipeline.from_pretrained(smoke_teacher)
    fresh.load_lora_weights(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(predict_velocity(fresh.transformer, x, t, cond), v_student, atol=1e-5)
    with torch.no_grad():  # the shared base still has both adapters and is unchanged
        assert torch.equal(predict_velocity(AdapterView(shared, None), x, t, cond), predict_velocity(base, x, t, cond))
