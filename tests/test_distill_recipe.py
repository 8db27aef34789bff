"""The recipe options of distillation (distill/README.md, "Recipe options"), each on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import SD3Transformer2DModel

from sd35flash import flow
from sd35flash.config import merge
from sd35flash.data.prompts import PromptSource, shapes_prompts
from sd35flash.distill.adversarial import Discriminator, d_loss, g_loss, reinit_draws, softplus_d_loss, softplus_g_loss
from sd35flash.distill.config import DMDConfig, GANConfig, load_distill_config
from sd35flash.distill.critic import Critic
from sd35flash.distill.dmd import evaluation_point, evaluation_times
from sd35flash.distill.method import FlowDMD
from sd35flash.distill.models import DistillModels
from sd35flash.distill.real import from_renders
from sd35flash.distill.trajectory import tg_loss
from sd35flash.errors import ConfigError, UserError
from sd35flash.models.latents import encode_latents
from sd35flash.sampling import PromptEmbeds
from sd35flash.world import render


@pytest.fixture(scope="module")
def models(smoke_teacher) -> DistillModels:
    torch.manual_seed(0)
    return DistillModels.load(str(smoke_teacher))


@pytest.fixture(scope="module")
def source() -> PromptSource:
    return shapes_prompts(32, seed=0)


def _image_size(models: DistillModels) -> int:
    return int(models.teacher.config.sample_size) * 2 ** (len(models.pipe.vae.config.block_out_channels) - 1)


def _cfg(**over):
    cfg = merge(load_distill_config("smoke"),
                {"trajectory": {"steps": 0}, "gan": {"real": "renders", "num_real": 0}, "num_prompts": 32})
    return merge(cfg, over)


def _method(models, source, cfg) -> FlowDMD:
    real = from_renders(models.pipe.vae, source, cfg.gan.num_real, _image_size(models)) if cfg.gan.enabled else None
    method = FlowDMD(cfg, models, source, Accelerator(cpu=True), real=real)
    method.prepare()
    return method


class Inputs:
    """What the fake transformer is called with (a forward pre-hook: the real call, recorded)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[dict] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append({k: kwargs[k].detach().clone() for k in ("timestep", "encoder_hidden_states",
                                                                  "pooled_projections")})

    def __enter__(self) -> Inputs:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


# -- 1. GAN real side from renders, paired prompts ------------------------------------------------
def test_render_bank_encodes_each_specs_render_lazily(models, source):
    size = _image_size(models)
    bank = from_renders(models.pipe.vae, source, 0, size, seed=123)
    assert len(bank) == len(source) and bank.prompts == source.prompts and not bank.cache
    got = bank.take(torch.tensor([5, 2, 5]))
    assert sorted(bank.cache) == [2, 5]  # only what was drawn, each once
    images = np.stack([render(source.specs[m], seed=123 + m, size=size) for m in (5, 2)])
    want = encode_latents(models.pipe.vae, images, progress=False)
    torch.testing.assert_close(got, torch.stack([want[0], want[1], want[0]]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[0], got[1])
    with pytest.raises(UserError, match="gan.real 'renders' needs --prompts shapes"):
        from_renders(models.pipe.vae, PromptSource("file", ["a cat"]), 0, size)


@pytest.mark.parametrize("paired", [True, False])
def test_paired_prompts_give_the_discriminator_identical_prompts(models, source, paired):
    method = _method(models, source, _cfg(gan={"paired": paired}, t5_dropout=0.0))
    n = method.cfg.batch_size
    with Inputs(method.critic.fake) as rec:
        method.critic_loss(step=3, u=0)
    (call,) = rec.calls  # one forward: [fake side; real side]
    fake_side, real_side = call["encoder_hidden_states"][:n], call["encoder_hidden_states"][n:]
    assert torch.equal(fake_side, real_side) == paired
    assert torch.equal(call["pooled_projections"][:n], call["pooled_projections"][n:]) == paired


# -- 6. velocity-space trajectory guidance ------------------------------------------------------------
def test_velocity_tg_loss_is_the_x_loss_over_dt_squared(models):
    k = 4
    schedule = flow.sampling_schedule(k, models.shift)
    g = torch.Generator().manual_seed(0)
    states = torch.randn((2, k + 1, *models.latent_shape()), generator=g)
    cond = models.conditioner.full(["a red circle", "two blue squares"], "cpu")
    with torch.no_grad():
        for i in range(k):
            idx = torch.full((2,), i)
            dt = schedule[i + 1] - schedule[i]
            x = tg_loss(models.student, states, idx, schedule, cond, "x")
            v = tg_loss(models.student, states, idx, schedule, cond, "velocity")
            torch.testing.assert_close(v, x / dt**2, rtol=1e-5, atol=0)


# -- 5. DMD tau coverage, fake conditioned as the student ------------------------------------------
@pytest.mark.parametrize("k", [4, 2])
def test_dmd_tau_below_covers_low_noise(k):
    schedule = flow.sampling_schedule(k, 3.0)
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(k).repeat(64)
    u, pick = torch.rand(idx.shape, generator=g), torch.rand(idx.shape, generator=g)
    shared = evaluation_times(idx, schedule, DMDConfig(), u, pick)
    assert float(shared.tau.min()) >= 0.5  # the next-shared-time rule never reads below 0.5
    below = evaluation_times(idx, schedule, DMDConfig(tau="below"), u, pick)
    t_i = torch.tensor(schedule)[idx]
    assert bool((below.tau < t_i).all()) and not bool(below.renoise.any())
    assert float(below.tau.min()) < 0.25 and float(below.tau[idx == k - 1].max()) > 0.5 * schedule[k - 1]
    assert float(below.tau.min()) >= DMDConfig().random_tau_range[0]


@pytest.mark.parametrize("tau, last_step", [("next", "renoise"), ("next", "midpoint"), ("below", "renoise")])
def test_dmd_fresh_noise_keeps_the_shared_taus_and_renoises_every_sample(tau, last_step):
    schedule = flow.sampling_schedule(4, 3.0)
    g = torch.Generator().manual_seed(1)
    idx = torch.arange(4).repeat(16)
    u, pick = torch.rand(idx.shape, generator=g), torch.rand(idx.shape, generator=g)
    line = evaluation_times(idx, schedule, DMDConfig(tau=tau, last_step=last_step), u, pick)
    fresh = evaluation_times(idx, schedule, DMDConfig(tau=tau, last_step=last_step, noise="fresh"), u, pick)
    torch.testing.assert_close(fresh.tau, line.tau)
    assert bool(fresh.renoise.all()) and not bool(line.renoise[idx < 3].any())
    # on the line, only `next` with `last_step: renoise` re-noises (the last step, which has no time below it)
    assert bool(line.renoise[idx == 3].all()) == (tau == "next" and last_step == "renoise")
    # the point is the step's x0 prediction noised with the fresh eps, not a point on the line
    x_i, v, eps = (torch.randn(idx.shape[0], 2, 3, 3, generator=g) for _ in range(3))
    t_i = torch.tensor(schedule)[idx]
    x_tau, x0_hat = evaluation_point(x_i, v, t_i, fresh, eps)
    torch.testing.assert_close(x_tau, flow.interpolate(x0_hat, eps, fresh.tau))
    on_line, _ = evaluation_point(x_i, v, t_i, line, eps)
    assert not torch.allclose(x_tau[idx < 3], on_line[idx < 3])


@pytest.mark.parametrize("match", [True, False])
def test_fake_sees_the_students_conditioning(models, source, match):
    cfg = _cfg(t5_dropout=1.0, fake={"match_student_conditioning": match}, gan={"enabled": False})
    method = _method(models, source, cfg)
    with Inputs(method.critic.fake) as rec:
        method.critic_loss(step=1, u=0)
        method.student_loss(step=1)
    prompts = method.source.prompts
    full = method.cond.full(prompts[:1], "cpu")
    student = method.cond.for_student(full, torch.tensor([True]))
    want = student if match else full
    for call in rec.calls:
        emb = call["encoder_hidden_states"]
        assert torch.equal(emb[0] == 0, want.embeds[0] == 0)  # the dropped T5 block, or not
    assert not torch.equal(student.embeds, full.embeds)


# -- 4. fake warm-up, fake mixture ------------------------------------------------------------------
def test_fake_mixture_draws(models, source):
    lo, hi = DMDConfig().random_tau_range
    for mixture in ("shared", "uniform_steps"):
        method = _method(models, source, _cfg(fake={"mixture": mixture}, gan={"enabled": False}, batch_size=16))
        shared_times = set(round(t, 5) for t in method.schedule[1:method.k])
        with Inputs(method.critic.fake) as rec:
            method.critic_loss(step=2, u=0)
        taus = (rec.calls[0]["timestep"] / 1000).tolist()
        on_schedule = [round(t, 5) in shared_times for t in taus]
        if mixture == "shared":
            assert all(on_schedule)
        else:
            assert not any(on_schedule) and all(lo <= t <= hi for t in taus)
            assert min(taus) < 0.3 and max(taus) > 0.7


def test_fake_warmup_is_a_critic_only_stage(models, source):
    method = _method(models, source, _cfg(fake={"warmup_steps": 3, "updates": 2}))
    stages = {s.name: s for s in method.stages()}
    assert [s.name for s in method.stages()][:3] == ["trajectory", "fake_warmup", "dmd"]
    assert stages["fake_warmup"].steps == 3
    ups = list(stages["fake_warmup"].updates(0))
    assert len(ups) == 2 and all(u.optimizer is method.opt_c for u in ups)
    assert method.split_start == 0 + 3 + method.cfg.student.steps


# -- 2. discriminator options --------------------------------------------------------------------
def test_softplus_losses_match_their_formulas():
    real = [torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5]])]
    fake = [torch.tensor([[-3.0, 0.0]]), torch.tensor([[1.0]])]

    def sp(x):
        return float(np.log1p(np.exp(x)))

    want_d = ((sp(-2) + sp(1)) / 2 + (sp(-3) + sp(0)) / 2 + sp(-0.5) + sp(1)) / 2
    want_g = ((sp(3) + sp(0)) / 2 + sp(-1)) / 2
    assert float(softplus_d_loss(real, fake)) == pytest.approx(want_d, rel=1e-6)
    assert float(softplus_g_loss(fake)) == pytest.approx(want_g, rel=1e-6)
    assert float(d_loss("softplus", real, fake)) == pytest.approx(want_d, rel=1e-6)
    assert float(g_loss("hinge", fake)) == pytest.approx(-((-3.0 + 0.0) / 2 + 1.0) / 2)


def _fake3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                 caption_projection_dim=16, pooled_projection_dim=8)


def _critic_out(critic: Critic, b: int = 2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((b, 4, 8, 8), generator=g)
    cond = PromptEmbeds(torch.randn((b, 5, 16), generator=g), torch.randn((b, 8), generator=g))
    return critic(x, torch.full((b,), 0.6), cond, features=True)


def test_intermediate_heads_pooled_logits_and_backbone_weight():
    fake = _fake3()
    gan = GANConfig(blocks=[0, 1], head_channels=8, pool=True)
    critic = Critic(fake, gan)
    _, logits = _critic_out(critic)
    assert len(logits) == 2 and all(lg.shape == (2, 1) for lg in logits)
    assert len(Critic(_fake3(), GANConfig(blocks=[0, 1], head_channels=8)).disc.heads) == 2

    def backbone_grads(weight: float, on: bool = True) -> list[torch.Tensor | None]:
        f = _fake3()
        c = Critic(f, GANConfig(blocks=[1], head_channels=8, backbone_weight=weight, backbone_grad=on))
        torch.manual_seed(1)
        for h in c.disc.heads:
            h.reset_parameters()
        _, lg = _critic_out(c)
        d_loss("hinge", lg, [-x for x in lg]).backward()
        assert all(p.grad is not None for p in c.disc.parameters())
        return [p.grad for p in f.transformer_blocks[0].parameters()]

    full, tenth = backbone_grads(1.0), backbone_grads(0.1)
    for a, b in zip(full, tenth):
        torch.testing.assert_close(b, 0.1 * a, rtol=1e-4, atol=1e-7)
    assert all(g is None for g in backbone_grads(0.0))
    assert all(g is None for g in backbone_grads(1.0, on=False))


def test_gan_tau_uniform_draws_the_discriminators_noise_over_the_range(models, source):
    method = _method(models, source, _cfg(gan={"tau": "uniform"}, batch_size=16))
    n = method.cfg.batch_size
    with Inputs(method.critic.fake) as rec:
        method.critic_loss(step=4, u=0)
    taus = rec.calls[0]["timestep"] / 1000  # [fake flow matching; D fake; D real]
    assert taus.shape[0] == 3 * n
    d_fake, d_real = taus[n:2 * n], taus[2 * n:]
    assert torch.equal(d_fake, d_real)
    assert float(d_fake.min()) < 0.3 and float(d_fake.max()) > 0.7
    shared = set(round(t, 5) for t in method.schedule[1:method.k])
    assert not any(round(t, 5) in shared for t in d_fake.tolist())


def test_reinit_one_head_at_a_time():
    g = torch.Generator().manual_seed(0)

    def draw():
        return float(torch.rand((), generator=g))

    for _ in range(50):
        d = reinit_draws(3, "one", draw)
        assert len(d) == 3 and sum(x < 1.0 for x in d) <= 1
    each = reinit_draws(3, "each", draw)
    assert all(x < 1.0 for x in each)
    disc = Discriminator(16, 3, 8, "conv")
    assert len(disc.heads) == 3


@pytest.mark.parametrize("gan_lr", [0.0, 1e-2])
def test_gan_lr_steps_the_heads_at_their_own_rate(models, source, gan_lr):
    method = _method(models, source, _cfg(gan={"lr": gan_lr}, fake={"lr": 1e-4}))
    heads = list(method.critic.disc.parameters())
    groups = method.opt_c.param_groups
    assert sum(len(g["params"]) for g in groups) == len(list(method.critic.parameters()))
    if gan_lr:
        assert len(groups) == 2 and groups[1]["lr"] == gan_lr and groups[0]["lr"] == 1e-4
        assert {id(p) for p in groups[1]["params"]} == {id(p) for p in heads}
    before = [p.detach().clone() for p in heads]
    loss, _ = method.critic_loss(step=0, u=0)
    loss.backward()
    method.opt_c.step()
    # Adam's first step moves every parameter with a gradient by about its group's lr
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(heads, before))
    want = gan_lr or 1e-4
    assert 0.5 * want < moved < 1.5 * want


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("over, key", [
    ({"fake": {"updates": 0}}, "fake.updates"),
    ({"fake": {"warmup_steps": -1}}, "fake.warmup_steps"),
    ({"gan": {"backbone_weight": 0.5 + 1}}, "gan.backbone_weight"),
    ({"gan": {"num_real": 0, "real": "teacher"}}, "gan.num_real"),
    ({"dmd": {"tau": "below", "timestep_sharing": False}}, "dmd.tau"),
    ({"dmd": {"noise": "fresh", "timestep_sharing": False}}, "dmd.noise"),
    ({"gan": {"lr": -1e-3}}, "gan.lr"),
])
def test_impossible_recipes_name_the_key(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        merge(load_distill_config("smoke"), over).validate()
    assert "\n" not in str(e.value)


def test_recipe_preset_loads():
    cfg = load_distill_config("recipe")
    cfg.validate()
    assert cfg.gan.real == "renders" and cfg.gan.paired and cfg.gan.loss == "softplus"
    assert cfg.gan.discriminator_weight * cfg.gan.backbone_weight <= 0.01 + 1e-12
    assert cfg.trajectory.loss == "velocity" and cfg.dmd.tau == "below" and cfg.fake.mixture == "uniform_steps"
    assert cfg.fake.lr == cfg.student.lr and cfg.fake.updates >= 4 and cfg.fake.warmup_steps > 0


# -- 8. gradient variance along training -----------------------------------------------------------
def test_grad_variance_is_logged_along_stage_one(smoke_teacher, tmp_path):
    import json

    from sd35flash.distill.run import distill
    from sd35flash.paths import cache_root

    cfg = merge(load_distill_config("smoke"), {"trajectory": {"steps": 1}, "student": {"steps": 4},
                                               "split": {"steps": 0}, "grad_variance_every": 2,
                                               "grad_variance_batches": 2, "fake": {"warmup_steps": 1}})
    out = tmp_path / "gradvar-student"
    distill(cfg, str(smoke_teacher), out, progress=False)
    (metrics,) = (cache_root() / "distill").glob("gradvar-student-*/metrics.jsonl")
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    var = {r["step"]: r for r in rows if "gradvar/relative_variance" in r}
    assert sorted(var) == [4, 6]  # stage 1 is steps 2..6 (after 1 TG and 1 warm-up step)
    for r in var.values():
        assert 0.0 < r["gradvar/relative_variance"] <= 1.0 + 1e-9 and -1.0 <= r["gradvar/mean_cosine"] <= 1.0


# -- 7. scaling curve collection --------------------------------------------------------------------
def test_scaling_curve_collects_and_plots(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    for (s, b), score, fd in (((300, 16), 0.5, 9.0), ((100, 16), 0.25, 12.0), ((300, 64), 0.75, 7.0)):
        (tmp_path / f"s{s}-b{b}-test.json").write_text(json.dumps(
            {"alignment": {"overall": score}, "fd_effnet": fd, "num_images": 400}))
    (tmp_path / "s100-b16.time.json").write_text(json.dumps({"wall_seconds": 60}))
    (tmp_path / "teacher-test.json").write_text(json.dumps({"alignment": {"overall": 0.6}, "fd_effnet": 5.0}))
    script = Path(__file__).resolve().parent.parent / "bench" / "distill_scaling.py"
    run = subprocess.run([sys.executable, str(script), str(tmp_path), "--teacher-json",
                          str(tmp_path / "teacher-test.json")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = json.loads((tmp_path / "scaling.json").read_text())
    assert [p["samples"] for p in out["points"]] == [1600, 4800, 19200]
    assert [p["overall"] for p in out["points"]] == [0.25, 0.5, 0.75]
    assert out["points"][0]["wall_seconds"] == 60 and out["points"][1]["wall_seconds"] is None
    assert out["teacher"] == {"overall": 0.6, "fd_effnet": 5.0}
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = subprocess.run([sys.executable, str(script), str(empty)], capture_output=True, text=True)
    assert bad.returncode == 2 and "no s<S>-b<B>-test.json" in bad.stderr


def test_recipe_preset_trains_end_to_end_on_a_tiny_budget(smoke_teacher, tmp_path):
    from sd35flash.distill.run import distill

    cfg = merge(load_distill_config("recipe"), {
        "batch_size": 4, "num_prompts": 16, "probe_images": 4, "probe_every": 0, "sample_every": 0,
        "log_every": 1, "checkpoint_every": 100, "grad_variance_every": 0,
        "trajectory": {"steps": 1, "teacher_steps": 8, "num_trajectories": 4, "batch_size": 4},
        "fake": {"warmup_steps": 1, "updates": 2}, "student": {"steps": 2, "warmup": 1},
        "gan": {"blocks": [0, -1], "head_channels": 16}, "split": {"steps": 1}})
    out = distill(cfg, str(smoke_teacher), tmp_path / "recipe-student", progress=False)
    assert (out / "model_index.json").is_file()


def test_gan_needs_specs_for_renders_and_existing_blocks(models, source):
    from sd35flash.distill.run import check_gan

    renders = _cfg()
    check_gan(renders, models, source)
    with pytest.raises(ConfigError, match="gan.real: renders needs --prompts shapes"):
        check_gan(renders, models, PromptSource("file", ["a cat", "a dog"]))
    with pytest.raises(ConfigError, match="gan.blocks index 3 is outside"):
        check_gan(_cfg(gan={"blocks": [3]}), models, source)


def test_recipe_options_at_their_defaults_keep_the_work_folder(tmp_path):
    from sd35flash.config import fingerprint, to_dict
    from sd35flash.distill.run import RECIPE_KEYS, work_dir

    cfg = load_distill_config("default")  # split on, memory at its defaults
    folder = work_dir(cfg, "t", "shapes", tmp_path / "s")
    conf = {k: v for k, v in to_dict(cfg).items() if k not in ("memory", "mode", "lora", "sharding", "resolution")}
    for section, keys in RECIPE_KEYS.items():
        for k in keys:
            (conf if section == "" else conf[section]).pop(k)
    assert folder.name == "s-" + fingerprint({"config": conf, "teacher": "t", "prompts": "shapes",
                                              "out": str(tmp_path / "s")})
    assert work_dir(merge(cfg, {"dmd": {"tau": "below"}}), "t", "shapes", tmp_path / "s") != folder
