"""Command-line wiring of the deployment runtime: ``--preset`` on ``generate`` / ``eval``, and the
``presets`` and ``bench`` subcommands. ``cli.py`` calls :func:`register` once; nothing here imports
torch until a command runs."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a device preset (precision, quantization, T5, ...); see `sd35flash presets`")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if present with --preset, else CPU) | cpu | cuda | cuda:N")
    p.add_argument("--no-embed-cache", action="store_true",
                   help="with --preset: do not cache prompt embeddings on disk")


def register(sub, generate_parser: argparse.ArgumentParser,
             eval_parser: argparse.ArgumentParser) -> dict[str, Callable]:
    """Add the runtime options and subcommands; returns ``{command: handler}`` for ``cli.COMMANDS``."""
    from .. import args as A

    _add_runtime_args(generate_parser)
    _add_runtime_args(eval_parser)
    ps = sub.add_parser("presets", help="list the device presets (precision, quantization, T5, backend)")
    ps.add_argument("--device", default="auto", help="mark which presets run on this device")
    ps.add_argument("--json", dest="json_out", help="also write the presets as JSON here")

    b = sub.add_parser("bench",
                       help="per preset: seconds/image, transformer s/step, peak memory, weights, alignment, FD")
    b.add_argument("--model", required=True, help="SD3 pipeline folder (student or teacher)")
    b.add_argument("--presets", required=True, help="comma-separated preset names")
    b.add_argument("--json", dest="json_out", required=True)
    b.add_argument("--teacher", help="also measure this teacher folder (one row, `teacher`)")
    b.add_argument("--teacher-steps", type=A.integer("--teacher-steps", 1, A.MAX_STEPS), default=28)
    b.add_argument("--teacher-preset", default="reference-fp32", help="preset for the teacher row")
    b.add_argument("--steps", type=A.steps, help="model steps (default: its sd35flash.json)")
    b.add_argument("--guidance", type=A.guidance, help="model guidance (default: its sd35flash.json)")
    b.add_argument("--num-images", type=A.integer("--num-images", 1, A.MAX_BATCH), default=4,
                   help="images per timed run (one batch)")
    b.add_argument("--runs", type=A.integer("--runs", 1, 1000), default=3, help="timed runs after one warm-up (median)")
    b.add_argument("--eval-images", type=A.integer("--eval-images", 1, 100_000), default=100,
                   help="test-split specs for alignment and FD")
    b.add_argument("--no-fd", action="store_true")
    b.add_argument("--device", default="auto")
    b.add_argument("--work", help="folder for quantized checkpoints and per-preset evaluations "
                                  "(default: beside --json)")
    return {"presets": cmd_presets, "bench": cmd_bench}


def deployed_from_args(args):
    """The :class:`~sd35flash.deploy.runtime.pipeline.DeployedPipeline` for ``--preset`` (``None`` without it)."""
    if not getattr(args, "preset", None):
        return None
    from .runtime.pipeline import load_deployed
    from .runtime.presets import get_preset

    preset = get_preset(args.preset)
    return load_deployed(args.model, preset, device=args.device, revision=args.revision,
                         embed_cache=False if args.no_embed_cache else None, force_no_t5=args.no_t5)


def cmd_presets(args) -> int:
    from ..io import atomic_write_json, check_writable_output
    from .runtime.pipeline import resolve_device
    from .runtime.presets import PRESETS, presets_table

    dev = resolve_device(args.device)
    if args.json_out:
        check_writable_output(args.json_out, "file", "--json")
    print(presets_table(dev))
    if args.json_out:
        atomic_write_json(args.json_out, {n: p.to_dict() for n, p in PRESETS.items()}, "--json")
    return 0


def cmd_bench(args) -> int:
    from ..io import check_writable_output
    from .tools.bench import BenchRequest, run_bench

    check_writable_output(args.json_out, "file", "--json")
    if args.work:
        check_writable_output(args.work, "dir", "--work")
    req = BenchRequest(model=args.model, presets=[p.strip() for p in args.presets.split(",") if p.strip()],
                       json_out=args.json_out, teacher=args.teacher, teacher_steps=args.teacher_steps,
                       teacher_preset=args.teacher_preset, steps=args.steps, guidance=args.guidance,
                       num_images=args.num_images, runs=args.runs, eval_images=args.eval_images,
                       fd=not args.no_fd, device=args.device, work=args.work)
    res = run_bench(req)
    rows = dict(res["presets"])
    if "teacher" in res:
        rows["teacher"] = res["teacher"]
    keys = ("seconds_per_image", "transformer_seconds_per_step", "peak_memory_gib", "weights_gib", "alignment",
            "fd_effnet")
    print(json.dumps({n: {k: r.get(k) for k in keys} for n, r in rows.items()}, indent=1))
    return 0
