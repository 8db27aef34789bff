"""Peak memory and seconds per step of DMD-style distillation steps at SD3.5-Medium size, against the
training-memory plan (``bench/gpu-distill.sh``).

``python -m sd35flash.deploy.tools.gpu_distill_bench --json OUT [--tiny] [--device cuda] [--settings lora,full]``

No downloads: the transformer is built from ``configs/sd35-medium-architecture.yaml`` with random
weights on the device; prompt embeddings are random tensors of the real shapes (333 tokens x 4096,
pooled 2048), as if precomputed with the text encoders freed. Each setting runs ``--steps`` steps
after one warm-up step; a step is what ``distill/trainer.py`` does in stage 1, without the
roll-out's extra student steps:

* critic update: the student's sample without gradients; the fake on ``[noised student samples,
  noised real latents]`` (``2 b``) with a conv discriminator head on its last block's features;
  flow-matching + hinge loss; backward; AdamW step;
* generator update: the student's velocity with gradients; the teacher with CFG (one ``2 b`` pass,
  bf16, no gradients); the fake at ``x_tau`` with frozen weights and the generator's hinge term
  through it; the DMD surrogate loss; backward; AdamW step; the EMA update.

Settings: ``lora`` -- one frozen bf16 base; ``student`` and ``fake`` peft adapters (rank
``--lora-rank``, the planner's target layers, in the base's dtype); the teacher is the base with
adapters disabled; no autocast. ``full`` -- fp32 student and fake copies (masters) under bf16
autocast, gradient checkpointing on both, the bf16 teacher.

Recorded per setting: seconds per step (median), the allocator's peak
(``torch.cuda.max_memory_allocated``) over the timed steps, the resident tensors after them (weights,
optimiser states, EMA) and the planner's prediction for the same setup (``plan_training``: peak of
the critic and generator phases, and the resident part). On a CPU the allocator's peak is not
available: the resident bytes are still compared with the plan. ``--tiny`` swaps in a toy-size
architecture so the whole path runs on a CPU in seconds (``tests/test_gpu_distill_bench.py``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sd35flash.plan.architecture import GIB, Architecture, load_architecture
from sd35flash.plan.train import LORA_TARGETS, TrainSetup, plan_training
from sd35flash.sizes import tensor_bytes

__all__ = ["run_distill_bench"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build_transformer(arch: Architecture, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(0)
            model = SD3Transformer2DModel.from_config(arch.configs["transformer"])
    finally:
        torch.set_default_dtype(old)
    return model.to(device=device, dtype=dtype).requires_grad_(False).eval()


def _velocity(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, pooled: torch.Tensor):
    return model(hidden_states=x, timestep=1000 * t, encoder_hidden_states=emb, pooled_projections=pooled,
                 return_dict=False)[0]


class _Models:
    """Teacher, student and fake of one setting, and how to switch between them."""

    def __init__(self, setting: str, teacher: torch.nn.Module, rank: int, compute: torch.dtype) -> None:
        self.setting = setting
        self.teacher = teacher
        if setting == "lora":
            from peft import LoraConfig

            for name in ("student", "fake"):
                teacher.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                               target_modules=list(LORA_TARGETS)), adapter_name=name)
            self.student = self.fake = teacher
            self.params = {n: [p for k, p in teacher.named_parameters() if f".{n}." in k and "lora_" in k]
                           for n in ("student", "fake")}
            teacher.requires_grad_(False)
        else:
            self.student = copy.deepcopy(teacher).float().requires_grad_(True).train()
            self.fake = copy.deepcopy(teacher).float().requires_grad_(True).train()
            for m in (self.student, self.fake):
                m.enable_gradient_checkpointing()
            self.params = {"student": list(self.student.parameters()), "fake": list(self.fake.parameters())}
        self.autocast = setting == "full" and compute != torch.float32

    def use(self, role: str, train: str) -> torch.nn.Module:
        """The module that plays ``role`` (teacher / student / fake) in the update of ``train``
        (student / fake): only ``train``'s parameters require gradients, through the whole update, so
        that checkpointed blocks recompute what they saved."""
        for name, params in self.params.items():
            for p in params:
                p.requires_grad_(name == train)
        if self.setting != "lora":
            return {"teacher": self.teacher, "student": self.student, "fake": self.fake}[role]
        if role == "teacher":
            self.teacher.disable_adapters()
        else:
            self.teacher.enable_adapters()
            self.teacher.set_adapter(role)
            for name, params in self.params.items():  # set_adapter changes requires_grad; restore ours
                for p in params:
                    p.requires_grad_(name == train)
        return self.teacher


def run_setting(setting: str, arch: Architecture, device: torch.device, resolution: int, batch: int, steps: int,
                rank: int, compute: torch.dtype, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build, run ``steps`` timed steps (after one warm-up) and measure one setting, then free its memory (the
    models, optimisers and EMA are locals of :func:`_measure_setting`, gone once it returns)."""
    row = _measure_setting(setting, arch, device, resolution, batch, steps, rank, compute, log)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _measure_setting(setting: str, arch: Architecture, device: torch.device, resolution: int, batch: int, steps: int,
                     rank: int, compute: torch.dtype, log: Callable[[str], None]) -> dict[str, Any]:
    """Build, run ``steps`` timed steps (after one warm-up) and measure one setting."""
    from sd35flash.distill.adversarial import Discriminator, FeatureTap, hinge_d_loss, hinge_g_loss

    tr_cfg = arch.configs["transformer"]
    vae_scale = 2 ** (len(arch.configs["vae"]["block_out_channels"]) - 1)
    side = resolution // vae_scale
    c = tr_cfg["in_channels"]
    text_tokens = arch.clip_tokens + arch.t5_tokens
    frozen_dtype = torch.bfloat16 if compute != torch.float32 else torch.float32
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    teacher = _build_transformer(arch, device, frozen_dtype)
    m = _Models(setting, teacher, rank, compute)
    dim = tr_cfg["num_attention_heads"] * tr_cfg["attention_head_dim"]
    disc = Discriminator(dim, 1, 64, "conv").to(device)
    fake_module = m.use("fake", "fake")
    tap = FeatureTap(fake_module, [len(fake_module.transformer_blocks) - 1])
    opt_s = torch.optim.AdamW(m.params["student"], lr=1e-5, weight_decay=0.0)
    opt_c = torch.optim.AdamW(m.params["fake"] + list(disc.parameters()), lr=1e-5, weight_decay=0.0)
    ema = [p.detach().float().clone() for p in m.params["student"]]
    build_s = time.perf_counter() - t0
    g = torch.Generator(device="cpu").manual_seed(1)

    def rnd(*shape: int, dtype: torch.dtype = frozen_dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    emb, pooled = rnd(batch, text_tokens, tr_cfg["joint_attention_dim"]), rnd(batch, tr_cfg["pooled_projection_dim"])
    uncond_emb = rnd(batch, text_tokens, tr_cfg["joint_attention_dim"])
    uncond_pooled = rnd(batch, tr_cfg["pooled_projection_dim"])
    ctx = (lambda: torch.autocast(device.type, dtype=compute)) if m.autocast else torch.enable_grad

    def features(model, x, t, e, p):
        tap.active = True
        try:
            v = _velocity(model, x, t, e, p)
        finally:
            tap.active = False
        return v, disc(tap.take())

    def step() -> dict[str, float]:
        t = torch.full((batch,), 0.75, device=device)
        noise, eps = rnd(batch, c, side, side), rnd(batch, c, side, side)
        # critic update
        with torch.no_grad(), ctx():
            x0_s = noise - _velocity(m.use("student", "fake"), noise, torch.ones_like(t), emb, pooled)
        x_fm = (1 - 0.75) * x0_s + 0.75 * eps
        x_r = (1 - 0.75) * rnd(batch, c, side, side) + 0.75 * eps
        with ctx():
            fake = m.use("fake", "fake")
            v, logits = features(fake, torch.cat([x_fm, x_r]).to(frozen_dtype), torch.cat([t, t]),
                                 torch.cat([emb, emb]), torch.cat([pooled, pooled]))
            fm = F.mse_loss(v[:batch].float(), (eps - x0_s).float())
            d_loss = hinge_d_loss([lg[batch:] for lg in logits], [lg[:batch] for lg in logits])
        (fm + 0.1 * d_loss).backward()
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)
        # generator update
        with ctx():
            student = m.use("student", "student")
            x_i = noise
            v = _velocity(student, x_i.to(frozen_dtype), torch.ones_like(t), emb, pooled).float()
            x0_hat = x_i.float() - v
            x_tau = x_i.float() + (0.75 - 1.0) * v
            with torch.no_grad():
                teacher_m = m.use("teacher", "student")
                both = _velocity(teacher_m, torch.cat([x_tau, x_tau]).to(frozen_dtype), torch.cat([t, t]),
                                 torch.cat([uncond_emb, emb]), torch.cat([uncond_pooled, pooled])).float()
                v_u, v_c = both.chunk(2)
                v_real = v_u + 4.0 * (v_c - v_u)
            v_fake, logits = features(m.use("fake", "student"), x_tau.to(frozen_dtype), t, emb, pooled)
            x0_real = x_tau - 0.75 * v_real
            x0_fake = x_tau - 0.75 * v_fake.detach().float()
            norm = (x0_hat - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6).detach()
            target = (x0_hat - (x0_fake - x0_real) / norm).detach()
            dmd = 0.5 * F.mse_loss(x0_hat, target)
            g_loss = hinge_g_loss(logits)
        (dmd + 0.01 * g_loss).backward()
        opt_s.step()
        opt_s.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(ema, m.params["student"]):
                e.mul_(0.99).add_(p.detach().float(), alpha=0.01)
        return {k: float(v.detach())
                for k, v in (("fake_loss", fm), ("d_loss", d_loss), ("dmd_loss", dmd), ("g_loss", g_loss))}

    losses = step()  # warm-up (optimiser states appear here)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        _sync(device)
        t1 = time.perf_counter()
        losses = step()
        _sync(device)
        times.append(time.perf_counter() - t1)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    opt_tensors = [v for o in (opt_s, opt_c) for st in o.state.values() for v in st.values() if torch.is_tensor(v)]
    models = [teacher, disc] + ([] if setting == "lora" else [m.student, m.fake])
    resident = tensor_bytes(unique_storage=True,
                            tensors=[t for mod in models for t in list(mod.parameters()) + list(mod.buffers())]
                            + opt_tensors + ema) / GIB
    setup = TrainSetup(config=arch.name, mode="lora" if setting == "lora" else "full", resolution=resolution,
                       batch=batch, gradient_checkpointing=setting == "full", lora_rank=rank,
                       teacher_dtype="bf16" if frozen_dtype == torch.bfloat16 else "fp32",
                       compute_dtype="bf16" if compute != torch.float32 else "fp32", encoders="freed", probe_batch=1)
    plan = plan_training(setup, arch)
    stage = {k: plan["phases"][k] for k in ("critic_update", "generator_update")}
    row = {"setting": setting, "build_seconds": build_s, "seconds_per_step": statistics.median(times),
           "steps": steps, "batch": batch, "resolution": resolution, "lora_rank": rank if setting == "lora" else None,
           "gradient_checkpointing": setting == "full", "peak_memory_gib": peak,
           "planned_peak_gib": max(stage.values()), "planned_phases_gib": stage,
           "resident_gib": resident,
           "planned_resident_gib": plan["phase_parts"]["critic_update"]["weights+optimizer+ema"]
           - plan["parts"]["weights"]["vae"],
           "peak_error": (max(stage.values()) - peak) / peak if peak else None, "losses": losses,
           "plan_setup": plan["setup"]}
    log(f"{setting}: {row['seconds_per_step']:.2f} s/step, peak "
        + (f"{peak:.3f} GiB" if peak is not None else "n/a (cpu)")
        + f" (planned {row['planned_peak_gib']:.3f}), resident {resident * 1024:.1f} MiB (planned "
        f"{row['planned_resident_gib'] * 1024:.1f})")
    tap.remove()
    return row


def run_distill_bench(out: str | Path, arch: Architecture, device: torch.device, resolution: int, settings: list[str],
                      batch: int = 1, steps: int = 3, rank: int = 64, compute: torch.dtype = torch.bfloat16,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every setting and write the JSON to ``out`` after each (a stopped run keeps what it measured)."""
    from sd35flash.io import atomic_write_text

    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "architecture": arch.name, "resolution": resolution, "compute_dtype": str(compute).split(".")[-1],
        "memory": "cuda max_memory_allocated" if device.type == "cuda" else "resident tensors only", "settings": {}}

    def save() -> None:
        result["wall_seconds"] = time.perf_counter() - t_start
        atomic_write_text(out, json.dumps(result, indent=1))

    for setting in settings:
        try:
            result["settings"][setting] = run_setting(setting, arch, device, resolution, batch, steps, rank, compute,
                                                      log)
        except torch.cuda.OutOfMemoryError as exc:  # record it and go on with the next setting
            result["settings"][setting] = {"error": f"OutOfMemoryError: {str(exc).splitlines()[0]}"}
            log(f"{setting}: out of memory")
            gc.collect()
            torch.cuda.empty_cache()
        save()
    result["finished"] = True
    save()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="DMD-style distillation steps at SD3.5-Medium size: memory vs plan")
    ap.add_argument("--json", dest="json_out", required=True)
    ap.add_argument("--tiny", action="store_true", help="toy-size architecture (CPU test of the code path)")
    ap.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute dtype")
    ap.add_argument("--resolution", type=int, help="pixels (default 1024; --tiny 64)")
    ap.add_argument("--settings", default="lora,full")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lora-rank", type=int, default=64)
    args = ap.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.tiny:
        from sd35flash.deploy.tools.gpu_bench import tiny_architecture

        arch = tiny_architecture()
    else:
        arch = load_architecture("sd35-medium")
    res = args.resolution or (64 if args.tiny else 1024)
    run_distill_bench(args.json_out, arch, device, res, [s for s in args.settings.split(",") if s], batch=args.batch,
                      steps=args.steps, rank=args.lora_rank, compute=getattr(torch, args.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
