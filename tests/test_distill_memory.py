"""Memory options of distillation (config section ``memory``): the exact ones leave a run unchanged
(precomputed embeddings with the encoders parked, gradient checkpointing, freed optimiser states,
branches allocated at stage 2, the EMA on the CPU, probes in small batches); the 16-bit teacher and
the 8-bit optimiser stay close to fp32 and resume exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sd35flash.config import merge
from sd35flash.distill.conditioning import precompute
from sd35flash.distill.config import load_distill_config
from sd35flash.distill.models import DistillModels
from sd35flash.distill.run import distill, work_dir
from sd35flash.distill.trajectory import teacher_identity
from sd35flash.errors import ConfigError, StopTraining, UserError
from sd35flash.models.pipeline_io import load_pipeline
from sd35flash.sampling import guided_velocity
from sd35flash.train.ema import OffloadedEMA
from sd35flash.train.optim import free_state, make_optimizer

SUBS = ("transformer", "transformer_branch0", "transformer_branch1", "transformer_presplit")


def _cfg(**memory):
    base = {"probe_every": 3, "probe_images": 3, "memory": {"free_finished_optimizers": False, **memory}}
    return merge(load_distill_config("smoke"), base)  # TG 2, DMD 2, split 2 steps


def _state(folder, sub):
    return load_file(str(folder / sub / "diffusion_pytorch_model.safetensors"))


def _metrics(cfg, teacher, out):
    work = work_dir(cfg, teacher_identity(str(teacher), None), "shapes", out.resolve())
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def test_exact_memory_options_leave_the_run_unchanged(smoke_teacher, tmp_path):
    base_cfg = _cfg()
    lean_cfg = _cfg(conditioning="precompute", gradient_checkpointing=True, free_finished_optimizers=True,
                    ema_device="cpu", probe_batch=1)
    base = distill(base_cfg, str(smoke_teacher), tmp_path / "base", progress=False)
    lean = distill(lean_cfg, str(smoke_teacher), tmp_path / "lean", progress=False)
    for sub in SUBS:
        a, b = _state(base, sub), _state(lean, sub)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), sub
    ma, mb = _metrics(base_cfg, smoke_teacher, base), _metrics(lean_cfg, smoke_teacher, lean)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    names = {k for r in ma for k in r if k.endswith("loss") or k.startswith("probe/")}
    assert {"tg/loss", "dmd/loss", "fake/loss", "split0/dmd_loss", "probe/pixel_std"} <= names
    for ra, rb in zip(ma, mb):
        for k in names & set(ra):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    # the lean run exports the teacher's text encoders, which it parked during training
    te = load_pipeline(lean).text_encoder_3.state_dict()
    assert all(torch.equal(v, load_pipeline(smoke_teacher).text_encoder_3.state_dict()[k]) for k, v in te.items())


def test_precomputed_conditioning_equals_live_and_names_unknown_prompts(smoke_teacher):
    models = DistillModels.load(str(smoke_teacher))
    prompts = ["a red circle", "a blue square", "two green triangles"]
    table = precompute(models.conditioner, prompts + ["a red circle"], "cpu", batch_size=2)
    assert len(table) == 4  # three distinct prompts and the empty one
    live, pre = models.conditioner.full(prompts[::-1], "cpu"), table.full(prompts[::-1], "cpu")
    assert torch.allclose(live.embeds, pre.embeds, atol=1e-6) and torch.allclose(live.pooled, pre.pooled, atol=1e-6)
    u_live, u_pre = models.conditioner.uncond(2, "cpu"), table.uncond(2, "cpu")
    assert torch.allclose(u_live.embeds, u_pre.embeds, atol=1e-6) and u_pre.embeds.shape[0] == 2
    drop = torch.tensor([True, False, True])
    a, b = models.conditioner.for_student(live, drop), table.for_student(pre, drop)
    assert torch.allclose(a.embeds, b.embeds, atol=1e-6) and float(a.embeds[0, table.clip_len:].abs().sum()) == 0
    models.park_encoders()
    assert models.pipe.text_encoder is None and models.pipe.text_encoder_3 is None
    assert torch.equal(table.full(["a blue square"], "cpu").embeds, pre.embeds[1:2])  # needs no encoder
    with pytest.raises(UserError, match="'a green diamond' has no precomputed embedding"):
        table.full(["a green diamond"], "cpu")
    models.unpark_encoders()
    assert models.pipe.text_encoder_3 is not None


def test_gradient_checkpointing_gives_identical_gradients(smoke_teacher):
    plain = DistillModels.load(str(smoke_teacher))
    ckpt = DistillModels.load(str(smoke_teacher), gradient_checkpointing=True)
    assert ckpt.student.is_gradient_checkpointing and not plain.student.is_gradient_checkpointing
    assert ckpt.fake.is_gradient_checkpointing and not ckpt.pipe.transformer.is_gradient_checkpointing
    cond = plain.conditioner.full(["a red circle", "a blue square"], "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *plain.latent_shape()), generator=g)
    target = torch.randn((2, *plain.latent_shape()), generator=g)
    t = torch.tensor([0.9, 0.4])
    grads = []
    for m in (plain, ckpt):
        v = guided_velocity(m.student, x, t, cond, None, 1.0)
        ((v - target) ** 2).mean().backward()
        grads.append([p.grad.clone() for p in m.student.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert sum(float(a.abs().sum()) for a in grads[0]) > 0


def test_16bit_teacher_is_close_and_keeps_the_copies_in_fp32(smoke_teacher):
    ref = DistillModels.load(str(smoke_teacher))
    half = DistillModels.load(str(smoke_teacher), teacher_dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in half.teacher.parameters())
    assert all(p.dtype == torch.float32 for p in half.student.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ref.student.parameters(), half.student.parameters()))
    assert half.latent_shape() == ref.latent_shape()
    cond = ref.conditioner.full(["a red circle", "a blue square"], "cpu")
    uncond = ref.conditioner.uncond(2, "cpu")
    x = torch.randn((2, *ref.latent_shape()), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.9, 0.5])
    with torch.no_grad():
        v32 = guided_velocity(ref.teacher, x, t, cond, uncond, 4.0)
        v16 = guided_velocity(half.teacher, x, t, cond, uncond, 4.0)
    assert v16.dtype == torch.float32
    rel = float((v16 - v32).norm() / v32.norm())
    assert 0 < rel < 0.05, rel


def test_8bit_adamw_quantises_state_and_tracks_adamw():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 128)
    twin = torch.nn.Linear(128, 128)
    twin.load_state_dict(lin.state_dict())
    opt8, opt32 = make_optimizer(lin.parameters(), 1e-3, "adamw8bit"), make_optimizer(twin.parameters(), 1e-3)
    start = lin.weight.detach().clone()
    x = torch.randn(16, 128)
    for _ in range(5):
        for m, o in ((lin, opt8), (twin, opt32)):
            o.zero_grad()
            (m(x) ** 2).mean().backward()
            o.step()
    assert type(opt8.state[lin.weight]["exp_avg"]).__name__ == "OptimState8bit"
    step8, step32 = lin.weight.detach() - start, twin.weight.detach() - start
    assert float(step32.norm()) > 0 and float((step8 - step32).norm()) < 0.1 * float(step32.norm())
    free_state(opt8)
    assert len(opt8.state) == 0
    with pytest.raises(ConfigError, match="unknown optimizer 'sgd'"):
        make_optimizer(lin.parameters(), 1e-3, "sgd")


def test_offloaded_ema_matches_ema():
    from diffusers.training_utils import EMAModel

    lin = torch.nn.Linear(4, 3)
    a, b = EMAModel(lin.parameters(), decay=0.9), OffloadedEMA(lin.parameters(), "cpu", decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            for p in lin.parameters():
                p.add_(torch.randn_like(p))
        a.step(lin.parameters())
        b.step(lin.parameters())
    b.to("meta")  # the shadow stays on its home device
    assert all(s.device.type == "cpu" for s in b.shadow_params)
    assert all(torch.equal(x, y) for x, y in zip(a.shadow_params, b.shadow_params))


def test_16bit_teacher_with_8bit_adamw_resumes_exactly(smoke_teacher, tmp_path):
    cfg = merge(load_distill_config("smoke"), {"split": {"steps": 0}, "probe_every": 0,
                                               "memory": {"teacher_dtype": "bf16", "optimizer": "adamw8bit"}})
    straight = distill(cfg, str(smoke_teacher), tmp_path / "straight", progress=False)
    with pytest.raises(StopTraining):
        distill(cfg, str(smoke_teacher), tmp_path / "resumed", progress=False, stop_at=3)
    resumed = distill(cfg, str(smoke_teacher), tmp_path / "resumed", progress=False, resume=True)
    a, b = _state(straight, "transformer"), _state(resumed, "transformer")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    teacher = _state(smoke_teacher, "transformer")
    assert any(not torch.equal(a[k], teacher[k]) for k in a) and all(v.dtype == torch.float32 for v in a.values())
    m = _metrics(cfg, smoke_teacher, straight)
    assert all(torch.isfinite(torch.tensor(r["dmd/loss"])) for r in m if "dmd/loss" in r)


def test_memory_config_errors():
    with pytest.raises(ConfigError, match="memory.teacher_dtype"):
        merge(load_distill_config("smoke"), {"memory": {"teacher_dtype": "fp8"}})
    with pytest.raises(ConfigError, match="memory.probe_batch"):
        merge(load_distill_config("smoke"), {"memory": {"probe_batch": 0}})
