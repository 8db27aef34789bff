"""The ``sd35flash`` command line. Every user error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from . import args as A
from .deploy import commands as _deploy
from .errors import StopTraining, UserError
from .io import check_model_output, check_writable_output, read_text
from .prepare import register as _register_prepare
from .study import commands as _study
from .train.stopping import EXIT_STOPPED, stop_on_signals

#: Most prompts ``generate --prompts`` puts in one grid.
MAX_PROMPTS = 1024
_positive_int = A.positive_int  # kept for modules that registered their options with it


def _schedule(text: str) -> str:
    """``--schedule``, validated at parse time (before any model is named or loaded)."""
    from .evaluate.evaluator import parse_schedule

    try:
        parse_schedule(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sd35flash", description="SD3.5-Flash: few-step distillation of rectified-flow models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    w = sub.add_parser("world", help="the shapes world: judge self-test, spec files")
    wsub = w.add_subparsers(dest="world_command", required=True, parser_class=_Parser)
    wc = wsub.add_parser("check", help="judge self-test on renders, mismatches and junk")
    wc.add_argument("--num", type=A.integer("--num", 1, 100_000), default=200, help="scenes per category (default 200)")
    wc.add_argument("--seed", type=A.seed, default=0)
    wc.add_argument("--degraded", action="store_true", help="also blur + noise the renders (like model output)")
    wc.add_argument("--json", dest="json_out", help="write the result JSON here")
    wf = wsub.add_parser("fd-scale", help="FD anchors: renders vs renders (floor), mismatched specs, junk")
    wf.add_argument("--split", default="test")
    wf.add_argument("--num", type=A.integer("--num", 1, 100_000), default=200)
    wf.add_argument("--seed", type=A.seed, default=1)
    wf.add_argument("--json", dest="json_out")
    ws = wsub.add_parser("specs", help="write a split's specs as JSONL")
    ws.add_argument("--split", required=True, help="train | val | test | heldout")
    ws.add_argument("--num", type=A.integer("--num", 1, A.MAX_COUNT), default=200)
    ws.add_argument("--seed", type=A.seed, default=0)
    ws.add_argument("--out", required=True)

    pt = sub.add_parser("pretrain", help="train (or reuse) the toy teacher on the shapes world")
    pto = pt.add_mutually_exclusive_group(required=True)
    pto.add_argument("--out", help="folder for the finished SD3 pipeline")
    pto.add_argument("--snapshot", metavar="OUT", help="write the EMA pipeline at the newest checkpoint of this "
                     "preset's run (running or not; read-only on its work folder) to OUT, and train nothing")
    pt.add_argument("--preset", default="default",
                    help="smoke | quick | default | teacher | teacher-2 | teacher-3 | teacher-4 | teacher-5 | "
                         "teacher-gpu")
    pt.add_argument("--config", help="a YAML config instead of a preset")
    pt.add_argument("--resume", action="store_true", help="continue an unfinished run of the same config")
    pt.add_argument("--init", metavar="MODEL", help="start from this teacher (a shipped name, a pipeline "
                    "folder or preset:NAME): keep its VAE, continue its transformer and text encoders "
                    "(sets the config's `init`)")
    pt.add_argument("--time-limit", type=A.time_limit, metavar="DURATION", help="stop cleanly once this much time "
                    "has passed (e.g. 90m, 1.5h): a checkpoint at the end of the current step, then exit 75; "
                    "SIGTERM or SIGUSR1 does the same. Continue with --resume")
    pt.add_argument("--stop-at", type=A.integer("--stop-at", 1), metavar="STEP", help="stop the flow stage after "
                    "this step with a checkpoint (exit 75), e.g. to reproduce a shipped snapshot with --snapshot; "
                    "continue with --resume")
    pt.add_argument("--no-progress", action="store_true")

    g = sub.add_parser("generate", help="generate images from prompts")
    g.add_argument("prompt", nargs="?", help="the prompt (or use --prompts FILE)")
    g.add_argument("--model", required=True, help="SD3 pipeline folder or hub id")
    g.add_argument("--revision")
    g.add_argument("--prompts", help="a text file, one prompt per line; writes a grid")
    g.add_argument("--steps", type=A.steps)
    g.add_argument("--guidance", type=A.guidance)
    g.add_argument("--seed", type=A.seed, default=0)
    g.add_argument("--no-t5", action="store_true", help="run without T5 (zeros in its place)")
    g.add_argument("--variant", default="auto", help=VARIANT_HELP)
    g.add_argument("--out", required=True, help="output PNG")

    e = sub.add_parser("eval", help="alignment (judge), FD and timing on a split or a spec file")
    e.add_argument("--model", required=True)
    e.add_argument("--revision")
    e.add_argument("--steps", type=A.steps)
    e.add_argument("--guidance", type=A.guidance)
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--split", help="test | heldout | val | train")
    src.add_argument("--specs", help="a JSONL spec file; one image per line, cycling")
    e.add_argument("--num-images", type=A.integer("--num-images", 1, 100_000), default=200)
    e.add_argument("--seed", type=A.seed, default=0)
    e.add_argument("--batch-size", type=A.batch_size, default=32)
    e.add_argument("--no-t5", action="store_true")
    e.add_argument("--no-fd", action="store_true", help="skip the FD computation")
    e.add_argument("--variant", default="auto", help=VARIANT_HELP)
    e.add_argument("--schedule", type=_schedule,
                   help="sampling times: scheduler | uniform | a list such as 1,0.9,0.75,0.5,0 "
                   "(default: the model's own)")
    e.add_argument("--json", dest="json_out", required=True)
    e.add_argument("--save-images", help="also write every image and a manifest.jsonl here")

    ds = sub.add_parser("distill", help="distil a teacher into a 1/2/4-step student (trajectory guidance, DMD + GAN, "
                        "split-timestep branches)")
    ds.add_argument("--teacher", help="teacher SD3 pipeline folder or hub id (default: the cached `pretrain` teacher)")
    ds.add_argument("--revision", help="hub revision of --teacher")
    ds.add_argument("--out", required=True, help="folder for the student SD3 pipeline (+ sd35flash.json)")
    ds.add_argument("--student-steps", type=int, choices=(1, 2, 4), help="student steps K (default: the config's)")
    ds.add_argument("--preset", default="default", help="smoke | quick | default | recipe")
    ds.add_argument("--config", help="a YAML distill config instead of a preset")
    ds.add_argument("--prompts", help="shapes (default) or a text / JSONL prompt file")
    ds.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config value, e.g. --set dmd.timestep_sharing=false (repeatable)")
    ds.add_argument("--mode", choices=("full", "lora"), help="full: train full copies (default); lora: LoRA "
                    "adapters on one shared frozen base (config `mode`, `lora.rank/alpha/targets`)")
    ds.add_argument("--sharding", choices=("ddp", "fsdp"), help="ddp: whole models on every process (default); "
                    "fsdp: FSDP2 shards student, critic and teacher per block (full mode, under torchrun)")
    ds.add_argument("--resolution", type=A.resolution,
                    help="training images in pixels (default: the teacher's own size)")
    ds.add_argument("--prepared", metavar="DIR", help="a `sd35flash prepare` folder: its prompts, embeddings (the "
                    "text encoders are not loaded for training) and trajectories")
    ds.add_argument("--resume", action="store_true", help="continue an unfinished run of the same config")
    ds.add_argument("--init-from", metavar="WORK", help="start at stage 2 (split-timestep) from the end of stage 1 "
                    "of another run of this config (its work folder), instead of redoing stages 0-1")
    ds.add_argument("--from-work", metavar="WORK", help="use the work folder of an earlier run of this config: "
                    "continue it, or export its finished student to --out without training")
    ds.add_argument("--time-limit", type=A.time_limit, metavar="DURATION", help="stop cleanly once this much time "
                    "has passed (e.g. 90m, 1.5h): a checkpoint at the end of the current step, then exit 75; "
                    "SIGTERM or SIGUSR1 does the same. Continue with --resume")
    ds.add_argument("--no-progress", action="store_true")
    ds.add_argument("--force", action="store_true", help="skip the memory check (the planner's verdict that the "
                    "configuration does not fit on the visible devices)")

    m = sub.add_parser("merge", help="merge a split-timestep student's branches at a ratio (or weights)")
    m.add_argument("--student", required=True, help="student folder with split-timestep branches")
    m.add_argument("--out", required=True, help="folder for the merged student (branches kept)")
    mw = m.add_mutually_exclusive_group(required=True)
    mw.add_argument("--ratio", type=A.number("--ratio", -1e9, 1e9),  # [0, 1] is checked with the weights
                    help="W = (1 - r) W_0 + r W_1; 0 = branch 0 (noisy t), 1 = branch 1")
    mw.add_argument("--weights", help="comma-separated w_b (>= 0, sum 1), one per branch")
    m.add_argument("--unmerged", action="store_true", help="make routing each step to its branch the default")

    ms = sub.add_parser("merge-sweep", help="evaluate merge ratios on val, pick one, write the curve and the student")
    ms.add_argument("--student", required=True, help="student folder with two split-timestep branches")
    ms.add_argument("--out", required=True, help="folder for sweep.json, sweep.png, the evaluations and student/")
    ms.add_argument("--ratios", default="0:1:0.1", help="start:stop:step (inclusive) or a list 0,0.3,1")
    ms.add_argument("--split", default="val", help="val only (test and heldout are refused)")
    ms.add_argument("--num-images", type=A.integer("--num-images", 1, 100_000), default=100)
    ms.add_argument("--seed", type=A.seed, default=0)
    ms.add_argument("--batch-size", type=A.batch_size, default=32)
    ms.add_argument("--fd-tolerance", type=A.number("--fd-tolerance", 0.0, 100.0), default=0.1,
                    help="admit ratios with FD <= (1 + tol) x the sweep's lowest FD (default 0.1)")

    inf = sub.add_parser("info", help="a model folder's sd35flash.json and, for split students, branch memory")
    inf.add_argument("model", help="model folder")

    COMMANDS.update(_deploy.register(sub, g, e))  # presets, bench; --preset on generate / eval
    _add_export_plan_commands(sub)
    COMMANDS.update(_register_prepare(sub))  # `prepare`: embeddings (and trajectories) before `distill`
    _study.register(sub)  # study create | serve | results | oracle

    mo = sub.add_parser("models", help="models shipped with the package (names for --model / --teacher)")
    mo.add_argument("--json", action="store_true", help="print the list as JSON")
    mo.add_argument("--verify", action="store_true", help="also check every file against its checksum")

    d = sub.add_parser("demo", help="the whole chain on the shapes world: teacher, distillation, evaluation, report")
    d.add_argument("--preset", default="quick", choices=("smoke", "quick", "full"),
                   help="smoke (tests, ~3 min) | quick (`make demo`: shipped teacher, quick students) | full "
                   "(shipped teacher, default recipe)")
    d.add_argument("--out", default="runs/demo", help="output folder (report, evaluations, students)")
    d.add_argument("--teacher", help="distil this teacher (folder or shipped name) instead of the preset's")
    d.add_argument("--num-images", type=A.integer("--num-images", 1, 100_000))
    d.add_argument("--no-progress", action="store_true")
    return p


VARIANT_HELP = ("split-timestep students: auto (the folder's default) | merged | unmerged (each step on its "
                "branch) | presplit (before stage 2)")
def _add_export_plan_commands(sub) -> None:
    """`export` (ONNX, optional int8) and `plan` (memory planner); handlers in deploy/."""
    x = sub.add_parser("export", help="export a pipeline's transformer, VAE decoder and text encoders (ONNX)")
    x.add_argument("--model", required=True, help="SD3 pipeline folder or hub id")
    x.add_argument("--format", required=True, choices=("onnx",), help="onnx (Core ML is not implemented)")
    x.add_argument("--out", required=True, help="output folder (*.onnx + sd35flash-onnx.json)")
    x.add_argument("--int8", action="store_true", help="onnxruntime int8 dynamic quantization (not the VAE)")
    x.add_argument("--resolution", type=A.resolution, help="image size in pixels (default: the model's)")
    x.add_argument("--no-progress", action="store_true")
    pl = sub.add_parser("plan", help="predict the memory a preset (or, with --train, a distillation) needs")
    pl.add_argument("--config", required=True, help="sd35-medium | sd35-large | an SD3 pipeline folder")
    pl.add_argument("--preset", help="desktop-16bit-t5 | laptop-8bit-no-t5 | mobile-6bit-no-t5 | cpu-onnx-int8")
    pl.add_argument("--resolution", type=A.resolution, default=1024, help="image size in pixels")
    pl.add_argument("--cfg", action="store_true", help="classifier-free guidance (batch 2 per image; teachers)")
    pl.add_argument("--batch", type=A.integer("--batch", 1, A.MAX_BATCH), default=1,
                    help="images per batch (--train: per GPU)")
    pl.add_argument("--json", dest="json_out", help="write the plan JSON here")
    _add_train_plan_arguments(pl)


def _add_train_plan_arguments(pl) -> None:
    """`plan --train`: per-GPU memory of a distillation (plan/train.py)."""
    t = pl.add_argument_group("--train (distillation memory per GPU)")
    t.add_argument("--train", action="store_true", help="plan a distillation run instead of inference")
    t.add_argument("--mode", choices=("full", "lora"), default="full", help="full fine-tuning or LoRA adapters")
    t.add_argument("--gpus", type=A.integer("--gpus", 1, 65536), default=1)
    t.add_argument("--sharding", choices=("ddp", "fsdp"), help="default: fsdp for full mode on > 1 GPU")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw")
    t.add_argument("--teacher-dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    t.add_argument("--ema", choices=("device", "cpu", "off"), default="device", help="where the student's EMA lives")
    t.add_argument("--lora-rank", type=A.integer("--lora-rank", 1, 65536), default=64)
    t.add_argument("--encoders", choices=("freed", "resident"), default="freed",
                   help="freed: prompt embeddings precomputed; resident: text encoders stay loaded")
    t.add_argument("--no-gan", action="store_true", help="without the discriminator (critic batch b, not 2b)")
    t.add_argument("--split-branches", type=A.integer("--split-branches", 0, 64), default=0,
                   help="stage-2 branches (0: no stage 2)")
    t.add_argument("--probe-batch", type=A.integer("--probe-batch", 1, A.MAX_BATCH), default=1)


def _cmd_export(args) -> int:
    from .deploy.export.onnx_export import check_export_output, check_export_parts, copy_export, read_manifest
    from .deploy.export.onnx_runtime import cached_export
    from .models.pipeline_io import is_local_path, load_pipeline
    from .paths import cache_root

    check_export_output(args.out)
    if is_local_path(args.model):
        check_export_parts(args.model)
    pipe = load_pipeline(args.model)
    cached = cached_export(pipe, cache_root() / "onnx", int8=args.int8, resolution=args.resolution,
                           progress=not args.no_progress)
    out = copy_export(cached, args.out)
    graphs = read_manifest(out)["graphs"]
    sizes = ", ".join(f"{g} {info['bytes'] / 2**20:.1f} MiB" for g, info in graphs.items())
    print(f"wrote {out} ({'int8' if args.int8 else 'fp32'}): {sizes}")
    return 0


def _cmd_plan(args) -> int:
    from .deploy.tools.plan import plan_memory, plan_to_text
    from .io import atomic_write_json

    if args.json_out:
        check_writable_output(args.json_out, "file", "--json")
    if args.train:
        from .plan.train import TrainSetup, plan_training, training_plan_to_text

        setup = TrainSetup(config=args.config, mode=args.mode, gpus=args.gpus, sharding=args.sharding,
                           resolution=args.resolution, batch=args.batch,
                           gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
                           teacher_dtype=args.teacher_dtype, ema=args.ema, lora_rank=args.lora_rank,
                           encoders=args.encoders, gan=not args.no_gan, split_branches=args.split_branches,
                           probe_batch=args.probe_batch)
        res = plan_training(setup)
        text = training_plan_to_text(res)
    elif args.preset is None:
        raise UserError("plan needs --preset NAME (inference) or --train (distillation)")
    else:
        res = plan_memory(args.config, args.preset, args.resolution, cfg=args.cfg, batch=args.batch)
        text = plan_to_text(res)
    if args.json_out:
        atomic_write_json(args.json_out, res, "--json")
    print(text)
    return 0


def _cmd_world(args) -> int:
    from .io import atomic_write_json, to_json

    if args.world_command in ("check", "fd-scale"):
        if args.json_out:
            check_writable_output(args.json_out, "file", "--json")
        if args.world_command == "check":
            from .world.selftest import run_selftest

            res = run_selftest(args.num, seed=args.seed, progress=True, degraded=args.degraded)
        else:
            from .evaluate.fd_scale import fd_scale
            from .world import SPLITS

            if args.split not in SPLITS:
                raise UserError(f"unknown split {args.split!r}; choose one of {', '.join(SPLITS)}")
            res = fd_scale(args.split, args.num, args.seed)
        if args.json_out:
            atomic_write_json(args.json_out, res, "--json")
        print(to_json(res))
        return 0
    from .world import SPLITS, split_specs
    from .world.spec import write_jsonl

    if args.split not in SPLITS:
        raise UserError(f"unknown split {args.split!r}; choose one of {', '.join(SPLITS)}")
    check_writable_output(args.out, "file")
    write_jsonl(args.out, split_specs(args.split, args.num, seed=args.seed))
    print(f"wrote {args.num} {args.split} specs to {args.out}")
    return 0


def _cmd_pretrain(args) -> int:
    from .pretrain.run import pretrain
    from .toy_teacher import load_pretrain_config

    cfg = load_pretrain_config(args.preset, args.config)
    if args.init:
        cfg.init = args.init
    name = Path(args.config).stem if args.config else args.preset
    if args.stop_at is not None and (args.snapshot or args.stop_at >= cfg.flow.steps):
        why = ("it stops training, which --snapshot does not do" if args.snapshot
               else f"this config's flow stage ends at step {cfg.flow.steps}; pass a smaller step")
        raise UserError(f"--stop-at {args.stop_at}: {why}")
    if args.snapshot:
        from .pretrain.snapshot import snapshot

        check_model_output(args.snapshot, "--snapshot")
        snapshot(cfg, name, Path(args.snapshot))
        return 0
    check_model_output(args.out)
    with stop_on_signals(args.time_limit):
        out = pretrain(cfg, Path(args.out), name, resume=args.resume, progress=not args.no_progress,
                       stop_at=args.stop_at)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"teacher ready: {out}")
    return 0


def _read_prompts(path: str) -> list[str]:
    p = Path(path)
    prompts = [line.strip() for line in read_text(p, "prompt file").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {p} holds no prompts; write one prompt per line")
    if len(prompts) > MAX_PROMPTS:
        raise UserError(f"prompt file {p} holds {len(prompts)} prompts; a grid takes at most {MAX_PROMPTS}")
    return prompts


def _cmd_generate(args) -> int:
    from .imaging import make_grid, save_png
    from .models.branches import sampling_transformer
    from .models.pipeline_io import load_pipeline
    from .models.sampling_settings import resolve_sampling
    from .sampling import generate

    if args.prompts and args.prompt:
        raise UserError("pass either a prompt or --prompts FILE, not both")
    prompts = _read_prompts(args.prompts) if args.prompts else [args.prompt or ""]
    if any(not p.strip() for p in prompts):
        raise UserError("the prompt is empty; pass some text, e.g. \"a red circle\"")
    if not args.out.lower().endswith(".png"):
        raise UserError(f"--out must be a .png file, got {args.out}")
    check_writable_output(args.out, "file")
    dp = _deploy.deployed_from_args(args)
    pipe = dp.pipe if dp else load_pipeline(args.model, revision=args.revision, device=_plain_device(args))
    schedule, steps, guidance = resolve_sampling(pipe, args.model, args.steps, args.guidance)
    seeds = [args.seed + i for i in range(len(prompts))]
    model = sampling_transformer(pipe, args.model, args.variant)
    imgs = generate(pipe, prompts, seeds, schedule, guidance=guidance, use_t5=not args.no_t5, transformer=model,
                    name=str(args.model),
                    **(dp.generate_kwargs(prompts, guidance) if dp else {}))
    out = imgs[0] if len(imgs) == 1 else make_grid(imgs, scale=2, captions=prompts, caption_width=150)
    save_png(args.out, out)
    print(f"wrote {args.out} ({len(prompts)} image(s), {steps} steps, guidance {guidance})")
    return 0


def _cmd_eval(args) -> int:
    from .evaluate.evaluator import EvalRequest, evaluate, load_specs

    check_writable_output(args.json_out, "file", "--json")
    if args.save_images:  # an existing folder is written into only when it holds earlier saved images
        check_model_output(args.save_images, "--save-images", marker="manifest.jsonl")
    load_specs(args.split, args.specs, 1)  # a bad split or spec file fails before the model loads
    req = EvalRequest(model=args.model, steps=args.steps, guidance=args.guidance, split=args.split,
                      specs_file=args.specs, num_images=args.num_images, seed=args.seed,
                      batch_size=args.batch_size, use_t5=not args.no_t5, fd=not args.no_fd, revision=args.revision,
                      variant=args.variant, device=_plain_device(args), schedule=args.schedule)
    dp = _deploy.deployed_from_args(args)
    req.use_t5 = dp.use_t5 if dp else req.use_t5
    res = evaluate(req, args.json_out, save_images=args.save_images,
                   **({"pipe": dp.pipe, "encoder": dp.encoder, "size": dp.size,
                       "extra": {"preset": dp.preset.to_dict()}} if dp else {}))
    a = res["alignment"]
    print(json.dumps({"alignment": a, "fd_effnet": res.get("fd_effnet"), "seconds_per_image": res["seconds_per_image"],
                      "variant": res["variant"], "transformer_bytes": res["transformer_bytes"],
                      "json": args.json_out, "grid": res["grid"]}, indent=1))
    return 0


def _cmd_distill(args) -> int:
    from .config import merge, parse_overrides
    from .distill.config import load_distill_config
    from .distill.run import distill

    cfg = load_distill_config(args.preset, args.config)
    if args.overrides:
        cfg = merge(cfg, parse_overrides(args.overrides), where="--set")
    if args.student_steps is not None:
        cfg = merge(cfg, {"student_steps": args.student_steps})
    for key in ("mode", "sharding", "resolution"):
        if getattr(args, key) is not None:
            cfg = merge(cfg, {key: getattr(args, key)})
    recipe = (args.config or f"preset:{args.preset}") + "".join(f" --set {o}" for o in args.overrides) \
        + "".join(f" --{k} {getattr(args, k)}" for k in ("mode", "sharding", "resolution", "prepared")
                  if getattr(args, k) is not None)
    check_model_output(args.out)
    with stop_on_signals(args.time_limit):
        out = distill(cfg, args.teacher, Path(args.out), prompts=args.prompts, revision=args.revision,
                      recipe=recipe, resume=args.resume, progress=not args.no_progress, init=args.init_from,
                      from_work=args.from_work, force=args.force, prepared=args.prepared)
    print(f"student ready: {out} ({cfg.student_steps} steps)")
    return 0


def _cmd_merge(args) -> int:
    from .models.branches import memory_report
    from .models.merge import ratio_weights, write_merged

    if args.ratio is not None:
        weights = ratio_weights(args.ratio)
    else:
        try:
            weights = [float(x) for x in args.weights.split(",")]
        except ValueError:
            raise UserError(f"--weights {args.weights!r} must be comma-separated numbers") from None
        if len(weights) > 64 or any(not math.isfinite(w) or w < 0 for w in weights):
            raise UserError(f"--weights {args.weights!r} must be up to 64 finite numbers >= 0 summing to 1")
    student = Path(args.student).expanduser()
    if not student.is_dir():
        raise UserError(f"--student {student} {'is a file' if student.exists() else 'does not exist'}; "
                        "pass a split-timestep student folder")
    check_model_output(args.out)
    out = write_merged(args.student, Path(args.out), weights, unmerged=True if args.unmerged else None,
                       note={"source": str(args.student), "weights": weights})
    print(json.dumps({"out": str(out), **memory_report(out)}, indent=1))
    return 0


def _cmd_merge_sweep(args) -> int:
    from .evaluate.merge_sweep import SweepRequest, check_request, merge_sweep, parse_ratios

    req = SweepRequest(student=args.student, out=args.out, ratios=parse_ratios(args.ratios), split=args.split,
                       num_images=args.num_images, seed=args.seed, batch_size=args.batch_size,
                       fd_tolerance=args.fd_tolerance)
    check_request(req)
    res = merge_sweep(req)
    print(json.dumps({"chosen_ratio": res["chosen_ratio"], "chosen_student": res["chosen_student"],
                      "curve": [{"ratio": p["ratio"], "overall": p["alignment"]["overall"], "fd_effnet": p["fd_effnet"]}
                                for p in res["points"]], "json": str(Path(args.out) / "sweep.json")}, indent=1))
    return 0


def _cmd_info(args) -> int:
    from .models.branches import memory_report
    from .models.pipeline_io import MODEL_INDEX
    from .models.student_info import read_student_info

    if not Path(args.model).exists():
        raise UserError(f"{args.model} does not exist; pass a model folder")
    if not (Path(args.model) / MODEL_INDEX).is_file():
        raise UserError(f"{args.model} is not a model folder (no {MODEL_INDEX})")
    info = read_student_info(args.model)
    out: dict = {"model": args.model, "student": info.to_dict() if info is not None else None}
    if out["student"] is not None:
        out["student"].pop("extra", None)  # the full recipe; read sd35flash.json for it
    if info is not None and info.split is not None:
        out["memory"] = memory_report(args.model)
    print(json.dumps(out, indent=1))
    return 0


def _cmd_models(args) -> int:
    from .models.registry import list_models, list_retired, verify_asset

    models = list_models()
    for m in models if args.verify else []:
        verify_asset(m)
    if args.json:
        print(json.dumps([m.to_json() for m in models], indent=1))
        return 0
    if not models:
        print("no models are shipped with this install")
    for m in models:
        print(f"{m.name}  {m.role}{' (default)' if m.default else ''}  {m.steps} steps, guidance {m.guidance}  "
              f"{m.dtype}, {m.bytes / 1e6:.1f} MB  {m.folder}")
    for r in list_retired():
        print(f"retired: {r.name} (replaced by {r.replaced_by}; in git commit {r.commit[:12]}, "
              f"src/sd35flash/assets/{r.path})")
    return 0


#: Arguments that name a model: a folder, a hub id or a shipped name (`sd35flash models`).
MODEL_ARGS = ("model", "teacher")


def resolve_model_args(args) -> None:
    """Replace every shipped model name among ``MODEL_ARGS`` by its verified folder."""
    from .models.registry import resolve_model

    for attr in MODEL_ARGS:
        if isinstance(getattr(args, attr, None), str):  # study create's --model NAME=MODEL list resolves itself
            setattr(args, attr, resolve_model(getattr(args, attr)))


def _cmd_demo(args) -> int:
    from .demo import run_demo

    check_writable_output(args.out, "dir")
    run_demo(args.preset, Path(args.out), num_images=args.num_images, progress=not args.no_progress,
             teacher=args.teacher)
    return 0


COMMANDS = {"world": _cmd_world, "pretrain": _cmd_pretrain, "generate": _cmd_generate, "eval": _cmd_eval,
            "distill": _cmd_distill, "merge": _cmd_merge, "merge-sweep": _cmd_merge_sweep, "info": _cmd_info,
            "demo": _cmd_demo, "models": _cmd_models}
COMMANDS.update({"export": _cmd_export, "plan": _cmd_plan, "study": _study.run})


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "failed"


def _check_device(args) -> None:
    """Any ``--device`` is resolved before work starts: a device this machine lacks is an error."""
    if getattr(args, "device", None) not in (None, "auto"):
        from .deploy.runtime.pipeline import resolve_device

        resolve_device(args.device)


def _plain_device(args) -> str:
    """The device of a run without ``--preset``: ``--device`` when given, else the CPU."""
    return "cpu" if getattr(args, "device", "auto") in (None, "auto") else args.device


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. "torchvision not installed" notices
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        _check_device(args)
        resolve_model_args(args)
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"sd35flash: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a path problem no check above foresaw: still one line, never a traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"sd35flash: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:
        print(f"sd35flash: error: an input file is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8",
              file=sys.stderr)
        return 2
    except StopTraining as e:  # asked to stop (--time-limit, SIGTERM/SIGUSR1) after a checkpoint
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"sd35flash: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print("sd35flash: interrupted; checkpoints written so far are kept (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
