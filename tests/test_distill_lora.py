"""``distill --mode lora``: student, fake and split branches are adapters on one frozen base that, with
the adapters disabled, is exactly the teacher; training moves only the adapters; a LoRA run resumes
exactly; the fused export loads in stock diffusers, and the adapter alone (``student_lora/``) loaded
into the teacher with ``load_lora_weights`` reproduces it."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from sd35flash.cli import main
from sd35flash.config import merge
from sd35flash.distill.config import load_distill_config
from sd35flash.distill.models import DistillModels
from sd35flash.distill.prompts import load_prompts
from sd35flash.distill.run import LORA_SUBFOLDER, distill
from sd35flash.distill.trainer import DistillTrainer
from sd35flash.errors import StopTraining
from sd35flash.models.lora import AdapterView
from sd35flash.sampling import encode_prompts, predict_velocity
from sd35flash.train.runtime import make_accelerator

LORA = {"mode": "lora", "lora": {"rank": 4, "alpha": 4.0}}


def _cfg(**over):
    base = {"trajectory": {"steps": 2}, "student": {"steps": 2}, "split": {"steps": 0}, **LORA}
    return merge(load_distill_config("smoke"), {**base, **over})


def _probe(pipe):
    g = torch.Generator().manual_seed(3)
    c = pipe.transformer.config
    x = torch.randn((2, c.in_channels, c.sample_size, c.sample_size), generator=g)
    return x, torch.tensor([0.9, 0.4]), encode_prompts(pipe, ["a red circle", "a blue square"], device="cpu")


def test_lora_models_share_one_frozen_base_and_train_only_adapters(smoke_teacher, tmp_path):
    """Teacher = base with adapters disabled; after DMD and split steps the base is bit-identical,
    student, fake and branch adapters moved, and each has only its own adapter's parameters."""
    cfg = _cfg(trajectory={"steps": 0}, gan={"enabled": False}, split={"steps": 1}, probe_images=0)
    torch.manual_seed(0)
    models = DistillModels.load(str(smoke_teacher), lora=cfg.lora)
    base = models.pipe.transformer
    assert models.teacher.base is base and models.student.base is base and models.fake.base is base
    plain = StableDiffusion3Pipeline.from_pretrained(smoke_teacher).transformer
    x, t, cond = _probe(models.pipe)
    with torch.no_grad():
        assert torch.equal(predict_velocity(models.teacher, x, t, cond), predict_velocity(plain, x, t, cond))
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if ".lora_" not in n}

    def names(m):
        return {id(p) for p in m.parameters()}

    assert not list(models.teacher.parameters()) and names(models.student).isdisjoint(names(models.fake))
    assert all(p.requires_grad for p in models.student.parameters())
    start = {n: p.detach().clone() for n, p in base.named_parameters() if ".lora_" in n}
    acc = make_accelerator(cfg.runtime, tmp_path, log_with=None)
    trainer = DistillTrainer(cfg, models, load_prompts("shapes", cfg.num_prompts, seed=0), tmp_path, acc,
                             progress=False)
    student = trainer.run()
    assert isinstance(student, AdapterView) and student.name == "student"
    after = dict(base.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())  # the base never moved
    moved = {a for n, v in start.items() if not torch.equal(after[n], v) for a in ("student", "fake") if f".{a}." in n}
    assert moved == {"student", "fake"}
    assert set(base.peft_config) == {"student", "fake", "branch0", "branch1"}
    for b, branch in enumerate(trainer.branches):
        assert branch.name == f"branch{b}" and names(branch).isdisjoint(names(models.student))
    with torch.no_grad():  # still exactly the teacher with the adapters disabled
        assert torch.equal(predict_velocity(models.teacher, x, t, cond), predict_velocity(plain, x, t, cond))
    acc.end_training()


@pytest.fixture(scope="module")
def straight(smoke_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "straight"
    return distill(_cfg(), str(smoke_teacher), out, progress=False)


def test_lora_resume_equals_uninterrupted(smoke_teacher, straight, tmp_path):
    out = tmp_path / "resumed"
    with pytest.raises(StopTraining):
        distill(_cfg(), str(smoke_teacher), out, progress=False, stop_at=3)
    distill(_cfg(), str(smoke_teacher), out, progress=False, resume=True)
    a = SD3Transformer2DModel.from_pretrained(straight / "transformer").state_dict()
    b = SD3Transformer2DModel.from_pretrained(out / "transformer").state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    name = "pytorch_lora_weights.safetensors"
    from safetensors.torch import load_file

    la, lb = load_file(straight / LORA_SUBFOLDER / name), load_file(out / LORA_SUBFOLDER / name)
    assert la.keys() == lb.keys() and all(torch.allclose(la[k], lb[k], atol=1e-6) for k in la)


def test_lora_export_fused_and_adapter_reproduce_the_student(smoke_teacher, straight):
    student = StableDiffusion3Pipeline.from_pretrained(straight)  # stock diffusers, no peft layers
    assert not any(".lora_" in n for n, _ in student.transformer.named_parameters())
    teacher = StableDiffusion3Pipeline.from_pretrained(smoke_teacher)
    x, t, cond = _probe(teacher)
    with torch.no_grad():
        v_teacher = predict_velocity(teacher.transformer, x, t, cond)
        v_fused = predict_velocity(student.transformer, x, t, cond)
    assert not torch.allclose(v_fused, v_teacher, atol=1e-5)  # training moved the student
    teacher.load_lora_weights(straight / LORA_SUBFOLDER)
    with torch.no_grad():
        v_adapter = predict_velocity(teacher.transformer, x, t, cond)
    assert torch.allclose(v_adapter, v_fused, atol=1e-5)


def test_mode_flag_and_bad_lora_settings(smoke_teacher, tmp_path, capsys):
    assert main(["distill", "--teacher", str(smoke_teacher), "--out", str(tmp_path / "s"), "--preset", "smoke",
                 "--mode", "lora", "--set", "lora.rank=0", "--no-progress"]) == 2
    assert "lora needs rank >= 1" in capsys.readouterr().err


def test_lora_with_bf16_base_and_gradient_checkpointing(smoke_teacher, tmp_path):
    """``memory.teacher_dtype: bf16`` holds the shared base in bf16 (adapters fp32, velocities fp32);
    with gradient checkpointing on the base, DMD + GAN steps train the adapters and leave the base alone."""
    cfg = _cfg(trajectory={"steps": 0}, student={"steps": 1}, probe_images=0,
               memory={"teacher_dtype": "bf16", "gradient_checkpointing": True}, gan={"real": "renders"})
    models = DistillModels.load(str(smoke_teacher), teacher_dtype="bf16", gradient_checkpointing=True, lora=cfg.lora)
    base = models.pipe.transformer
    assert base.gradient_checkpointing and models.fake.gradient_checkpointing
    assert all(p.dtype == (torch.float32 if ".lora_" in n else torch.bfloat16) for n, p in base.named_parameters())
    x, t, cond = _probe(models.pipe)
    with torch.no_grad():
        assert predict_velocity(models.teacher, x, t, cond).dtype == torch.float32
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if ".lora_" not in n}
    start = [p.detach().clone() for p in models.student.parameters()]
    acc = make_accelerator(cfg.runtime, tmp_path, log_with=None)
    from sd35flash.distill.real import from_renders

    source = load_prompts("shapes", cfg.num_prompts, seed=0)
    size = int(base.config.sample_size) * 2 ** (len(models.pipe.vae.config.block_out_channels) - 1)
    real = from_renders(models.pipe.vae, source, cfg.gan.num_real, size, seed=7)
    DistillTrainer(cfg, models, source, tmp_path, acc, real=real, progress=False).run()
    after = dict(base.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert any(not torch.equal(p, s) for p, s in zip(models.student.parameters(), start))
    assert all(torch.isfinite(p).all() for p in models.student.parameters())
    acc.end_training()


def test_cli_mode_lora_with_split_branches(smoke_teacher, tmp_path):
    """``--mode lora`` through the CLI on the smoke preset (stages 0-2): the branches are adapters, the
    folder holds the folded branches and their merge, and loads in stock diffusers."""
    out = tmp_path / "split"
    assert main(["distill", "--teacher", str(smoke_teacher), "--out", str(out), "--preset", "smoke", "--mode", "lora",
                 "--set", "lora.rank=4", "--no-progress"]) == 0
    assert (out / "transformer_branch0").is_dir() and (out / "transformer_branch1").is_dir()
    assert (out / LORA_SUBFOLDER / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    b0 = SD3Transformer2DModel.from_pretrained(out / "transformer_branch0")
    assert not any(".lora_" in n for n, _ in pipe.transformer.named_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), b0.parameters()))


def test_grad_variance_reads_a_lora_run(smoke_teacher, straight):
    """``grad_variance`` rebuilds a LoRA run's models from its work folder: the student's gradients
    are its adapter's."""
    from sd35flash.distill.grad_variance import load_trainer, student_gradients
    from sd35flash.distill.run import work_dir
    from sd35flash.distill.trajectory import teacher_identity

    work = work_dir(_cfg(), teacher_identity(str(smoke_teacher), None), "shapes", straight.resolve())
    trainer, step = load_trainer(work)
    try:
        assert step == 4 and isinstance(trainer.student, AdapterView)
        grads = list(student_gradients(trainer, [7], sharing=True))
        assert len(grads[0]) == sum(p.numel() for p in trainer.student.parameters())
        assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    finally:
        trainer.acc._custom_objects.clear()
