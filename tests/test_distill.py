"""Distillation: one step of each loss on tiny models, timestep-sharing geometry, exact resume, the
student folder in stock diffusers, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from sd35flash import flow
from sd35flash.cli import main
from sd35flash.config import merge
from sd35flash.distill.adversarial import Discriminator, hinge_d_loss, hinge_g_loss, reinit_heads
from sd35flash.distill.config import DMDConfig, GANConfig, load_distill_config
from sd35flash.distill.critic import Critic, split_logits
from sd35flash.distill.dmd import dmd_loss, evaluation_point, evaluation_times
from sd35flash.distill.fake import fake_flow_loss, fake_input
from sd35flash.distill.models import DistillModels, params_frozen
from sd35flash.distill.rollout import rollout_to_step, student_sample, times_at
from sd35flash.distill.run import distill
from sd35flash.distill.trajectory import build_bank, load_or_build, teacher_schedule, tg_loss
from sd35flash.errors import StopTraining
from sd35flash.models.student_info import read_student_info
from sd35flash.sampling import PromptEmbeds, guided_velocity, predict_velocity

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a white diamond on the left"]


@pytest.fixture(scope="module")
def models(smoke_teacher) -> DistillModels:
    torch.manual_seed(0)
    return DistillModels.load(str(smoke_teacher))


def _batch(models: DistillModels, k: int = 4):
    b = len(PROMPTS)
    cond = models.conditioner.full(PROMPTS, "cpu")
    schedule = flow.sampling_schedule(k, models.shift)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn((b, *models.latent_shape()), generator=g)
    eps = torch.randn((b, *models.latent_shape()), generator=g)
    idx = torch.tensor([0, 1, 2, 3]) % k
    return cond, schedule, noise, eps, idx


def _grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def test_models_frozen_and_copied(models):
    assert all(not p.requires_grad for p in models.teacher.parameters())
    assert all(not p.requires_grad for p in models.pipe.text_encoder_3.parameters())
    assert all(p.requires_grad for p in models.student.parameters())
    for a, b in zip(models.teacher.parameters(), models.student.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_shared_points_lie_on_the_student_line(models):
    cond, schedule, noise, eps, idx = _batch(models)
    x_i = rollout_to_step(models.student, noise, schedule, cond, idx)
    t_i = times_at(schedule, idx)
    with torch.no_grad():
        v = predict_velocity(models.student, x_i, t_i, cond)
    u = torch.full((4,), 0.3)
    pts = evaluation_times(idx, schedule, DMDConfig(), u, u)
    x_tau, x0_hat = evaluation_point(x_i, v, t_i, pts, eps)
    eps_hat = flow.eps_from_v(x_i, v, t_i)
    on_line = ~pts.renoise
    assert on_line[:3].all() and pts.renoise[3]  # the last step (index 3) falls back to re-noising
    expect = flow.interpolate(x0_hat, eps_hat, pts.tau)
    assert torch.allclose(x_tau[on_line], expect[on_line], atol=1e-5)
    assert torch.allclose(pts.tau[:3], torch.tensor(schedule[1:4]))  # next shared time below t_i
    assert (pts.tau != t_i).all() and all(min(abs(float(t) - s) for s in schedule[1:4]) < 1e-6 for t in pts.tau)
    # the re-noised sample lies on x0_hat's line with the fresh noise
    assert torch.allclose(x_tau[3], flow.interpolate(x0_hat[3:], eps[3:], pts.tau[3:])[0], atol=1e-5)
    vanilla = evaluation_times(idx, schedule, DMDConfig(timestep_sharing=False), u, u)
    assert vanilla.renoise.all() and torch.allclose(vanilla.tau, torch.full((4,), 0.02 + 0.96 * 0.3))


def test_student_loss_reaches_only_the_student(models):
    cond, schedule, noise, eps, idx = _batch(models)
    critic = Critic(models.fake, GANConfig(head_channels=8))
    x_i = rollout_to_step(models.student, noise, schedule, cond, idx)
    t_i = times_at(schedule, idx)
    v = predict_velocity(models.student, x_i, t_i, cond)
    pts = evaluation_times(idx, schedule, DMDConfig(), torch.rand(4), torch.rand(4))
    x_tau, x0_hat = evaluation_point(x_i, v, t_i, pts, eps)
    with torch.no_grad():
        v_real = guided_velocity(models.teacher, x_tau, pts.tau, cond, models.conditioner.uncond(4, "cpu"), 4.0)
    with params_frozen(critic):
        v_fake, logits = critic(x_tau, pts.tau, cond, features=True)
    dm = dmd_loss(x0_hat, x_tau, pts.tau, v_real, v_fake.detach())
    g = hinge_g_loss(logits)
    assert dm.loss.shape == () and torch.isfinite(dm.loss) and torch.isfinite(dm.grad_norm) and torch.isfinite(g)
    assert logits[0].shape == (4, models.teacher.config.sample_size ** 2 // models.teacher.config.patch_size ** 2)
    (dm.loss + 0.01 * g).backward()
    student = _grads(models.student)
    assert all(gr is not None and torch.isfinite(gr).all() for gr in student)
    assert sum(float(gr.abs().sum()) for gr in student) > 0
    assert all(gr is None for gr in _grads(models.teacher))
    assert all(gr is None for gr in _grads(critic))  # the fake and heads get nothing from the student loss
    assert all(p.requires_grad for p in critic.parameters())  # unfrozen again
    models.student.zero_grad(set_to_none=True)


def test_dmd_surrogate_gradient_is_the_normalised_difference():
    x0_hat = torch.randn(2, 3, 4, 4, requires_grad=True)
    x_tau, tau = torch.randn(2, 3, 4, 4), torch.tensor([0.5, 0.75])
    v_real, v_fake = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    dmd_loss(x0_hat, x_tau, tau, v_real, v_fake).loss.backward()
    x0_real = x_tau - tau.view(-1, 1, 1, 1) * v_real
    diff = tau.view(-1, 1, 1, 1) * (v_real - v_fake)  # x0_fake - x0_real
    norm = (x0_hat.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(x0_hat.grad, diff / norm / x0_hat.numel(), atol=1e-6)


def test_critic_step_trains_fake_and_heads_only(models):
    cond, schedule, noise, eps, idx = _batch(models)
    critic = Critic(models.fake, GANConfig(head_channels=8, blocks=[0, -1]))
    x0_s = student_sample(models.student, noise, schedule, cond, idx)
    tau = torch.tensor(schedule[1:5])
    x_fm = fake_input(x0_s, eps, tau)
    x_real = flow.interpolate(torch.randn_like(x0_s), torch.randn_like(x0_s), tau)
    v, logits = critic(torch.cat([x_fm, x_real]), torch.cat([tau, tau]), PromptEmbeds.cat([cond, cond]), features=True)
    fake_lg, real_lg = split_logits(logits, [4, 4])
    loss = fake_flow_loss(v[:4], x0_s, eps) + 0.1 * hinge_d_loss(real_lg, fake_lg)
    assert v.shape == (8, *models.latent_shape()) and len(logits) == len(critic.disc.heads) and torch.isfinite(loss)
    loss.backward()
    assert all(gr is not None for gr in _grads(critic))
    assert all(gr is None for gr in _grads(models.student)) and all(gr is None for gr in _grads(models.teacher))
    critic.zero_grad(set_to_none=True)


def test_head_reinit():
    disc = Discriminator(32, 2, 8, "conv")
    opt = torch.optim.AdamW(disc.parameters())
    sum(lg.sum() for lg in disc([torch.randn(2, 16, 32)] * 2)).backward()
    opt.step()
    before = [p.clone() for p in disc.parameters()]
    assert reinit_heads(disc, opt, 0.005, [0.5, 0.5], seed=3) == []
    assert all(torch.equal(a, b) for a, b in zip(before, disc.parameters()))
    assert reinit_heads(disc, opt, 0.005, [0.5, 0.001], seed=3) == [1]
    assert all(torch.equal(a, b) for a, b in zip(before[: len(before) // 2], list(disc.heads[0].parameters())))
    assert not torch.equal(before[len(before) // 2], next(disc.heads[1].parameters()))
    assert all(p not in opt.state for p in disc.heads[1].parameters())


def test_trajectory_bank_and_tg_loss(models, tmp_path):
    sched_n, where = teacher_schedule(flow.sampling_schedule(4, 3.0), 8, 3.0)
    assert [round(sched_n[j], 6) for j in where] == [round(t, 6) for t in flow.sampling_schedule(4, 3.0)]

    def build():
        return build_bank(models.teacher, lambda ps: models.conditioner.full(ps, "cpu"),
                          lambda b: models.conditioner.uncond(b, "cpu"), PROMPTS,
                          flow.sampling_schedule(4, 3.0).step_times, 8, models.shift, 4.0, models.latent_shape(),
                          seed=5, batch_size=4, device="cpu")

    bank, reused = load_or_build(tmp_path / "b.pt", build)
    again, reused2 = load_or_build(tmp_path / "b.pt", build)
    assert not reused and reused2 and torch.equal(bank.states, again.states)
    assert bank.states.shape == (4, 5, *models.latent_shape()) and torch.isfinite(bank.states).all()
    cond = models.conditioner.full(PROMPTS, "cpu")
    loss = tg_loss(models.student, bank.states, torch.tensor([0, 1, 2, 3]), bank.schedule, cond)
    loss.backward()
    assert torch.isfinite(loss) and all(gr is not None for gr in _grads(models.student))
    assert all(gr is None for gr in _grads(models.teacher))
    models.student.zero_grad(set_to_none=True)


def _tiny(**over):
    return merge(load_distill_config("smoke"), {"trajectory": {"steps": 2}, "student": {"steps": 2}, **over})


def _transformer(folder):
    return StableDiffusion3Pipeline.from_pretrained(folder).transformer.state_dict()


@pytest.fixture(scope="module")
def straight(smoke_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "straight"
    return distill(_tiny(), str(smoke_teacher), out, progress=False)


def test_resume_equals_uninterrupted(smoke_teacher, straight, tmp_path):
    out = tmp_path / "resumed"
    with pytest.raises(StopTraining):  # stops after the trajectory stage, mid-recipe
        distill(_tiny(), str(smoke_teacher), out, progress=False, stop_at=2)
    assert main(["distill", "--teacher", str(smoke_teacher), "--out", str(out), "--preset", "smoke",
                 "--no-progress"]) == 2  # an unfinished run is never silently restarted
    distill(_tiny(), str(smoke_teacher), out, progress=False, resume=True)
    a, b = _transformer(straight), _transformer(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_student_folder_loads_in_stock_diffusers(smoke_teacher, straight):
    info = read_student_info(straight)
    assert info.steps == 4 and info.guidance == 1.0
    assert info.timesteps == pytest.approx([1.0, 0.9, 0.75, 0.5])
    pipe = StableDiffusion3Pipeline.from_pretrained(straight)
    out = pipe("a red circle", sigmas=info.sigmas_for(pipe.scheduler), guidance_scale=info.guidance,
               num_inference_steps=info.steps, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape[0] == 1
    assert [round(float(s), 5) for s in pipe.scheduler.sigmas] == [1.0, 0.9, 0.75, 0.5, 0.0]
    teacher = StableDiffusion3Pipeline.from_pretrained(smoke_teacher)
    assert any(not torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), teacher.transformer.parameters()))
    assert (straight / "sd35flash.json").is_file() and json.loads((straight / "sd35flash.json").read_text())["teacher"]


def _one_line(capsys, *needles):
    err = [ln for ln in capsys.readouterr().err.strip().splitlines()
           if ln.strip() and "it/s]" not in ln and not ln.startswith("Loading")]  # diffusers' load bars
    assert len(err) == 1, err
    for n in needles:
        assert n in err[0], err[0]


def test_bad_inputs_get_one_line(smoke_teacher, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student_steps: 4\nbogus_key: 1\n")
    assert main(["distill", "--teacher", str(smoke_teacher), "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    _one_line(capsys, "unknown config key", "bogus_key")
    for steps in ("0", "3"):
        with pytest.raises(SystemExit) as e:
            main(["distill", "--teacher", str(smoke_teacher), "--out", str(tmp_path / "o"), "--student-steps", steps])
        assert e.value.code == 2
        _one_line(capsys, "--student-steps", "invalid choice")
    notsd3 = tmp_path / "notsd3"
    notsd3.mkdir()
    (notsd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert main(["distill", "--teacher", str(notsd3), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "not an SD3 pipeline")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["distill", "--teacher", str(smoke_teacher), "--out", str(tmp_path / "o"),
                 "--prompts", str(empty)]) == 2
    _one_line(capsys, "holds no prompts")
    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path / "nocache"))
    noassets = tmp_path / "noassets"  # an install that ships no teacher (this package ships shapes-v3)
    noassets.mkdir()
    (noassets / "models.json").write_text('{"models": []}')
    monkeypatch.setenv("SD35FLASH_ASSETS", str(noassets))
    assert main(["distill", "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "sd35flash pretrain")


def test_collapse_alarm_stops_and_keeps_the_last_good_checkpoint(smoke_teacher, tmp_path):
    from sd35flash.errors import TrainingAlarm
    from sd35flash.train.checkpoint import CheckpointManager

    # ratio 2: any probe below twice the first one counts as collapse, so the probe at step 2 fires
    cfg = _tiny(probe_every=2, checkpoint_every=1, collapse_ratio=2.0, collapse_patience=1)
    with pytest.raises(TrainingAlarm, match="samples collapsed: probe pixel std"):
        distill(cfg, str(smoke_teacher), tmp_path / "s", progress=False)
    from sd35flash.distill.run import work_dir
    from sd35flash.distill.trajectory import teacher_identity

    work = work_dir(cfg, teacher_identity(str(smoke_teacher), None), "shapes", (tmp_path / "s").resolve())
    latest = CheckpointManager(work / "checkpoints").latest()
    assert latest is not None and latest.name.endswith("00000001")
    assert not (tmp_path / "s").exists()


def test_gradient_statistics_separate_signal_from_noise():
    from sd35flash.distill.grad_variance import gradient_statistics

    g = torch.randn(1000)
    same = gradient_statistics([g, g, g, g])
    assert same.trace_cov == pytest.approx(0.0, abs=1e-9) and same.mean_cosine == pytest.approx(1.0)
    noise = gradient_statistics([torch.randn(1000) for _ in range(16)])
    assert 0.8 < noise.relative_variance < 1.2 and abs(noise.mean_cosine) < 0.05
    mixed = gradient_statistics([g + 0.5 * torch.randn(1000) for _ in range(16)])
    assert mixed.relative_variance == pytest.approx(0.25 / 1.25, abs=0.05)


def test_grad_variance_at_a_checkpoint(smoke_teacher, straight):
    from sd35flash.distill.grad_variance import load_trainer, measure, student_gradients
    from sd35flash.distill.run import work_dir
    from sd35flash.distill.trajectory import teacher_identity

    work = work_dir(_tiny(), teacher_identity(str(smoke_teacher), None), "shapes", straight.resolve())
    trainer, step = load_trainer(work)
    try:
        assert step == 6  # the smoke preset: trajectory 2 + DMD 2 + split 2
        a = list(student_gradients(trainer, [7, 8], sharing=True))
        b = list(student_gradients(trainer, [7, 8], sharing=True))  # rewound: the same batches again
        c = list(student_gradients(trainer, [7, 8], sharing=False))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not torch.allclose(a[0], c[0])  # re-noising evaluates elsewhere
        assert all(torch.isfinite(x).all() and x.abs().sum() > 0 for x in a + c)
        stats = measure(trainer, batches=3)
        for name in ("timestep_sharing", "renoise"):
            s = stats[name]
            assert s["batches"] == 3 and 0.0 < s["relative_variance"] < 1.6 and s["trace_cov"] > 0
    finally:
        trainer.acc._custom_objects.clear()
