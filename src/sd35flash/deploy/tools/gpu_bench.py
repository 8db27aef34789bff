"""Latency and memory of an SD3.5-Medium-size pipeline with random weights (``bench/gpu.sh``).

``python -m sd35flash.deploy.tools.gpu_bench --json OUT [--tiny] [--device cuda] [--resolutions 512,1024]``

No downloads: every network is built from ``configs/sd35-medium-architecture.yaml`` (transformer,
CLIP-L, CLIP-G, T5-XXL encoder, VAE) with random initialisation, directly on the device in bf16, with
offline tokenizers padded to the real lengths (77 CLIP, 256 T5 tokens). Random weights give the same
latency and memory as trained ones. Per resolution, in one process so that ratios hold:

* ``student``: 4 Euler steps without guidance (the distilled model's schedule) and ``teacher``: 40
  steps with classifier-free guidance (batch 2 per step): end-to-end seconds per image (median of
  ``--repeats`` after ``--warmup``; prompt encoding + denoising + VAE decoding) and transformer
  seconds per step (median of timed denoising loops);
* peak memory of each, with the T5-XXL encoder loaded and again after it is deleted (the pipeline
  then feeds zeros, as SD3 does): on CUDA the allocator's peak (``max_memory_allocated``), on the CPU
  the weights' bytes plus the RSS growth during the call; beside each the memory planner's
  prediction (``plan_memory``), so the planner is checked on the GPU too;
* ``precisions``: the student's latency with the transformer in bf16, torchao int8 weight-only and
  torchao fp8 (dynamic activations, CUDA compute capability >= 8.9 only); a precision that cannot
  run is recorded with its reason instead of stopping the run;
* ``laptop_8bit_no_t5``: the student's peak memory with the int8 transformer and no T5 (the
  ``laptop-8bit-no-t5`` recipe with the CLIP encoders kept resident), beside the planner's
  prediction for that and as a fraction of bf16 with T5.

``--tiny`` swaps in a toy-size architecture (and 32/64 px) so that the whole path runs on a CPU in
seconds (``tests/test_gpu_bench.py``). The JSON is rewritten after every section, so a run that is
stopped keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sd35flash.deploy.tools.plan import plan_memory
from sd35flash.plan.architecture import GIB, Architecture, load_architecture
from sd35flash.sizes import module_bytes

__all__ = ["build_random_pipeline", "run_bench", "tiny_architecture"]

PROMPT = "a large red circle left of a small blue square"


def tiny_architecture() -> Architecture:
    """A toy-size SD3 architecture (the toy teacher's classes and wiring) for CPU runs of this bench."""
    from sd35flash.models.toy import ToyConfig, build_text_encoders, build_transformer, build_vae
    from sd35flash.world import all_words

    cfg = ToyConfig(image_size=64, latent_channels=4, vae_block_out_channels=(8, 16, 16), num_layers=2,
                    num_attention_heads=2, attention_head_dim=16, clip_hidden=16, clip_layers=1, clip_heads=2,
                    t5_d_model=32, t5_layers=1, t5_heads=2, text_max_length=16)
    enc = build_text_encoders(cfg, all_words())
    configs = {"transformer": dict(build_transformer(cfg).config), "vae": dict(build_vae(cfg).config)}
    for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        d = enc[attr].config.to_dict()
        configs[attr] = {k: v for k, v in d.items()
                         if not k.startswith("_") and k not in ("architectures", "transformers_version")}
    return Architecture("tiny", configs, clip_tokens=cfg.text_max_length, t5_tokens=cfg.text_max_length)


def build_random_pipeline(arch: Architecture, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A ``StableDiffusion3Pipeline`` of ``arch`` with random weights, built on ``device`` in ``dtype``."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sd35flash.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer
    from sd35flash.world import all_words

    c = arch.configs
    words = all_words()
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            parts = {
                "transformer": SD3Transformer2DModel.from_config(c["transformer"]),
                "vae": AutoencoderKL.from_config(c["vae"]),
                "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder"])),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder_2"])),
                "text_encoder_3": T5EncoderModel(T5Config(**c["text_encoder_3"])) if c.get("text_encoder_3") else None,
            }
    finally:
        torch.set_default_dtype(old)
    for m in parts.values():
        if m is not None:
            m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        tokenizer=build_clip_tokenizer(words, arch.clip_tokens),
        tokenizer_2=build_clip_tokenizer(words, arch.clip_tokens),
        tokenizer_3=build_t5_tokenizer(words, arch.t5_tokens), **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak(fn: Callable[[], Any], device: torch.device, resident: int) -> float:
    """Peak memory (GiB) while ``fn`` runs: the CUDA allocator's peak, or on the CPU ``resident`` weight
    bytes plus the growth of the resident set. Unreachable objects are collected first: a quantised
    copy of the transformer lives in reference cycles, and would otherwise count towards a later peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) / GIB
    from sd35flash.deploy.tools.plan_check import rss_peak_growth

    return (resident + rss_peak_growth(fn)) / GIB


def _quantized_copy(transformer: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """A copy of ``transformer`` quantised by torchao (``int8``: weight-only; ``fp8``: dynamic
    activations and weights, CUDA capability >= 8.9)."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    if precision == "fp8":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise RuntimeError("fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper)")
        config = Float8DynamicActivationFloat8WeightConfig()
    elif precision == "int8":
        config = Int8WeightOnlyConfig()
    else:
        raise ValueError(precision)
    m = copy.deepcopy(transformer)
    quantize_(m, config)
    return m


def _stored_gib(module: torch.nn.Module) -> float | None:
    """GiB of ``module``'s state dict as ``torch.save`` writes it (counts packed / quantised tensors);
    ``None`` when a tensor subclass cannot be saved."""
    import io

    buf = io.BytesIO()
    try:
        torch.save(module.state_dict(), buf)
    except Exception:
        return None
    return buf.tell() / GIB


def run_bench(out: str | Path, arch: Architecture, device: torch.device, dtype: torch.dtype, resolutions: list[int],
              student_steps: int = 4, teacher_steps: int = 40, guidance: float = 4.0, warmup: int = 1, repeats: int = 3,
              precisions: tuple[str, ...] = ("bf16", "int8", "fp8"),
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every section (see the module docstring) and write the JSON to ``out`` after each."""
    from sd35flash import flow
    from sd35flash.io import atomic_write_json
    from sd35flash.sampling import (
        encode_prompts,
        generate,
        latent_shape,
        make_noise,
        sample_latents,
        scheduler_schedule,
    )

    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype).split(".")[-1], "architecture": arch.name,
        "student_steps": student_steps, "teacher_steps": teacher_steps, "teacher_guidance": guidance,
        "warmup": warmup, "repeats": repeats, "memory": "cuda max_memory_allocated" if device.type == "cuda"
        else "weights + RSS growth", "resolutions": {},
    }

    def save() -> None:
        result["wall_seconds"] = time.perf_counter() - t_start
        atomic_write_json(out, result)

    t0 = time.perf_counter()
    pipe = build_random_pipeline(arch, device, dtype)
    result["build_seconds"] = time.perf_counter() - t0
    result["params"] = {name: sum(p.numel() for p in m.parameters()) for name, m in pipe.components.items()
                        if isinstance(m, torch.nn.Module)}
    log(f"built {arch.name} on {result['device']} in {result['build_seconds']:.1f}s: "
        + ", ".join(f"{k} {v / 1e9:.3f}B" for k, v in result["params"].items()))
    save()
    student_schedule = flow.sampling_schedule(student_steps, shift=float(pipe.scheduler.config.shift))  # METHOD.md
    teacher_schedule = scheduler_schedule(pipe, teacher_steps)
    runs = {"student": (student_schedule, 1.0), "teacher": (teacher_schedule, guidance)}
    no_t5_arch = Architecture(arch.name, {**arch.configs, "text_encoder_3": None}, arch.clip_tokens, arch.t5_tokens)

    def resident() -> int:
        return module_bytes(*(m for m in pipe.components.values() if isinstance(m, torch.nn.Module)))

    desktop = "desktop-16bit-t5"  # the planner preset the bf16 rows are compared with
    for res in resolutions:
        row: dict[str, Any] = {}
        result["resolutions"][str(res)] = row
        for name, (schedule, g) in runs.items():
            def one(s=schedule, g=g, res=res):
                return generate(pipe, [PROMPT], [0], s, guidance=g, height=res, width=res)

            e2e = _timed(one, device, warmup, repeats if name == "student" else max(1, repeats // 2 + 1))
            cond = encode_prompts(pipe, [PROMPT]).to(dtype=dtype)
            uncond = encode_prompts(pipe, [""]).to(dtype=dtype) if g > 1 else None
            noise = make_noise(latent_shape(pipe, res, res), [0], dtype=dtype, device=device)
            loop = _timed(lambda s=schedule: sample_latents(pipe.transformer, noise, s, cond, uncond, g), device, 0,
                          max(1, repeats // 2 + 1))
            peak = _peak(one, device, resident())
            planned = plan_memory(arch, desktop, res, cfg=g > 1)["peak_gib"]
            row[name] = {"steps": len(schedule) - 1, "guidance": g, "seconds_per_image": e2e,
                         "transformer_seconds_per_step": loop / (len(schedule) - 1), "peak_memory_gib": peak,
                         "planned_peak_gib": planned, "resident_weights_gib": resident() / GIB}
            log(f"{res}px {name}: {e2e:.3f} s/image, {loop / (len(schedule) - 1) * 1e3:.1f} ms/step, "
                f"peak {peak:.2f} GiB (planned {planned:.2f})")
            save()
        row["teacher_over_student"] = row["teacher"]["seconds_per_image"] / row["student"]["seconds_per_image"]
        row["precisions"] = {}
        for prec in precisions:
            try:
                model = (pipe.transformer if prec in ("bf16", "fp32")
                         else _quantized_copy(pipe.transformer, prec, device))
                schedule = runs["student"][0]
                sec = _timed(lambda m=model: generate(pipe, [PROMPT], [0], schedule, height=res, width=res,
                                                      transformer=m), device, warmup, repeats)
                row["precisions"][prec] = {"seconds_per_image": sec, "transformer_weights_gib": _stored_gib(model)}
                log(f"{res}px student {prec}: {sec:.3f} s/image")
                if model is not pipe.transformer:
                    del model
                gc.collect()
            except Exception as exc:  # record why a precision cannot run here, keep going
                first = str(exc).splitlines()[0] if str(exc) else ""
                row["precisions"][prec] = {"error": f"{type(exc).__name__}: {first}"}
                log(f"{res}px student {prec}: skipped ({row['precisions'][prec]['error']})")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()
    # again without T5: the pipeline feeds zeros in its place
    pipe.text_encoder_3 = None
    pipe.tokenizer_3 = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for res in resolutions:
        row = result["resolutions"][str(res)]
        row["no_t5"] = {}
        for name, (schedule, g) in runs.items():
            def one(s=schedule, g=g, res=res):
                return generate(pipe, [PROMPT], [0], s, guidance=g, height=res, width=res)

            peak = _peak(one, device, resident())
            planned = plan_memory(no_t5_arch, desktop, res, cfg=g > 1)["peak_gib"]
            row["no_t5"][name] = {"peak_memory_gib": peak, "planned_peak_gib": planned,
                                  "resident_weights_gib": resident() / GIB}
            log(f"{res}px {name} without T5: peak {peak:.2f} GiB (planned {planned:.2f})")
        save()
    # the laptop preset: int8 weight-only transformer, no T5 (the bf16 transformer is dropped first so
    # that the allocator's peak holds only the int8 weights)
    if "int8" in precisions:
        try:
            int8 = _quantized_copy(pipe.transformer, "int8", device)
            pipe.transformer = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            pipe.transformer = int8
            schedule = runs["student"][0]
            for res in resolutions:
                def one(res=res):
                    return generate(pipe, [PROMPT], [0], schedule, height=res, width=res)

                peak = _peak(one, device, resident())
                planned = plan_memory(arch, "laptop-8bit-no-t5", res, free_encoders=False)["peak_gib"]  # CLIPs stay
                row = result["resolutions"][str(res)]
                row["laptop_8bit_no_t5"] = {"peak_memory_gib": peak, "planned_peak_gib": planned,
                                            "resident_weights_gib": _stored_gib(int8) or resident() / GIB,
                                            "over_desktop": peak / row["student"]["peak_memory_gib"]}
                log(f"{res}px student int8 without T5 (laptop-8bit-no-t5): peak {peak:.2f} GiB (planned {planned:.2f}),"
                    f" {row['laptop_8bit_no_t5']['over_desktop']:.2f} of bf16 with T5")
        except Exception as exc:  # keep what was measured
            result["laptop_8bit_no_t5_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log(f"laptop-8bit-no-t5 section skipped ({result['laptop_8bit_no_t5_error']})")
        save()
    result["finished"] = True
    save()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="SD3.5-Medium-size latency/memory benchmark with random weights")
    ap.add_argument("--json", dest="json_out", required=True)
    ap.add_argument("--tiny", action="store_true", help="toy-size architecture at 32/64 px (CPU test of the code path)")
    ap.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--resolutions", help="comma-separated pixel sizes (default 512,1024; --tiny 32,64)")
    ap.add_argument("--teacher-steps", type=int, default=40)
    ap.add_argument("--student-steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precisions", default="bf16,int8,fp8")
    args = ap.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    arch = tiny_architecture() if args.tiny else load_architecture("sd35-medium")
    res = [int(r) for r in (args.resolutions or ("32,64" if args.tiny else "512,1024")).split(",")]
    precisions = tuple(p for p in args.precisions.split(",") if p)
    run_bench(args.json_out, arch, device, dtype, res, student_steps=args.student_steps,
              teacher_steps=args.teacher_steps, warmup=args.warmup, repeats=args.repeats, precisions=precisions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
