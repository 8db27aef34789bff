"""``sd35flash prepare``: compute a distillation's inputs once, before training.

``prepare`` writes into ``--out``::

    prepare.json        the settings (teacher, prompt source, recipe parts, resolution, dtype, fingerprint)
    prompts.jsonl       the prompt source in order (with scene specs for the shapes world);
                        ``--prompts OUT`` reads it back as a prompt source
    embeds/             the sharded prompt-embedding store (:mod:`sd35flash.text.store`)
    trajectories/       with ``--trajectories``: sharded 16-bit teacher trajectories
                        (:mod:`sd35flash.data.trajectories`)

Steps: read the prompts (a bad file fails before any model loads); load only the text encoders
(and the transformer / VAE configs, to check ``--resolution``); encode this rank's shards; write the
index; free the encoders; then, with ``--trajectories``, load the teacher transformer and integrate
this rank's trajectories from the stored embeddings. Under ``torchrun`` every rank writes its own
shards (shard ``s`` goes to rank ``s mod W``) and rank 0 writes the indexes after a barrier.
Training opens the folder with :func:`sd35flash.data.prepared.open_prepared`.
``--resume`` skips finished shards and rebuilds missing or damaged ones; without it an existing
``prepare`` folder is refused, never overwritten. Importing this module does not import torch (the
CLI registers the command at start-up).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .io import check_model_output
from .seeds import derive_seed

__all__ = ["PrepareRequest", "prepare", "register"]

PREPARE_FORMAT = 1


@dataclass
class PrepareRequest:
    """What ``sd35flash prepare`` computes. ``overrides`` are ``--set`` values for the distill recipe
    (it fixes the shapes source's size and seed, and the trajectory settings)."""

    teacher: str
    prompts: str
    out: Path
    resolution: int | None = None
    dtype: str = "bf16"
    batch: int = 32
    shard_size: int = 256
    resume: bool = False
    preset: str = "default"
    config: str | None = None
    overrides: dict = field(default_factory=dict)
    prompt_column: str | None = None
    use_t5: bool = True
    trajectories: bool = False
    revision: str | None = None
    progress: bool = True


class _Ranks:
    """Rank and world size from torchrun's environment; a gloo/nccl group when there is more than one."""

    def __init__(self, rank: int | None, world_size: int | None) -> None:
        import torch

        self._dist = torch.distributed
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        self.group = False  # this object made the process group (and closes it)
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        if rank is None and self.world > 1 and not self._dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            self._dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.group = True

    @property
    def coordinated(self) -> bool:
        """One process, or a process group to wait on: rank 0 alone writes the shared files."""
        return self.world == 1 or self._dist.is_initialized()

    def barrier(self) -> None:
        if self._dist.is_initialized():
            self._dist.barrier()

    def close(self) -> None:
        if self.group:
            self._dist.destroy_process_group()


def _recipe(req: PrepareRequest):
    from .config import merge
    from .distill.config import load_distill_config
    from .distill.run import resolve_guidance

    cfg = load_distill_config(req.preset, req.config)
    return resolve_guidance(merge(cfg, req.overrides, where="--set") if req.overrides else cfg, req.teacher)


def _check_out(req: PrepareRequest, settings: dict) -> None:
    from .data.prepared import MANIFEST

    out = req.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the prepared data")
    manifest = out / MANIFEST
    if manifest.is_file():
        if not req.resume:
            raise UserError(f"--out {out} already holds prepared data; pass --resume to finish or check it, "
                            "or choose a new folder")
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UserError(f"{manifest} is unreadable; choose a new --out folder") from None
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise UserError(f"--out {out} was prepared with other settings ({', '.join(diff)}); "
                            "use the same options with --resume, or choose a new folder")
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not a prepare folder; choose a new folder")


def prepare(req: PrepareRequest, rank: int | None = None, world_size: int | None = None) -> Path:
    """Write the embedding store (and, if asked, the teacher trajectories) for ``req``; returns ``req.out``.

    ``rank`` / ``world_size`` default to torchrun's; passed explicitly, each call writes that rank's
    shards and no process group is made (rank 0 then writes the index only once every shard exists).
    """
    from tqdm.auto import tqdm

    from .data.prepared import MANIFEST
    from .data.prompts import PREPARED_PROMPTS, load_prompts, write_prompts
    from .io import atomic_write_text
    from .models.pipeline_io import load_pipeline
    from .models.resolution import geometry_configs, latent_side
    from .sampling import clip_length, encode_prompts
    from .text.encoder import count_truncated, encoder_fingerprint, free_encoders
    from .text.store import DTYPES, StoreLayout, write_index, write_shards

    if req.dtype not in DTYPES:
        raise UserError(f"--dtype {req.dtype!r} is not one of {', '.join(DTYPES)}")
    req.out = check_model_output(req.out, "--out", marker=MANIFEST)
    cfg = _recipe(req)
    source = load_prompts(req.prompts, cfg.num_prompts, seed=cfg.runtime.seed, column=req.prompt_column)
    tr_cfg, vae_cfg = geometry_configs(req.teacher, req.revision)
    side = latent_side(tr_cfg, vae_cfg, req.resolution)
    ranks = _Ranks(rank, world_size)
    try:
        components = {"transformer": None, "vae": None}
        if not req.use_t5:
            components["text_encoder_3"] = None
        pipe = load_pipeline(req.teacher, revision=req.revision, device=ranks.device, **components)
        use_t5 = bool(req.use_t5 and pipe.text_encoder_3 is not None)
        if not use_t5:  # the pipeline sizes T5's zero block from the transformer's config: a weightless one
            pipe.transformer = _meta_transformer(tr_cfg)
        fp = encoder_fingerprint(pipe, use_t5)
        settings = _settings(req, cfg, source.prompts, tr_cfg, vae_cfg, side, fp, use_t5,
                             float(pipe.scheduler.config.get("shift", 1.0)))
        _check_out(req, settings)
        ranks.barrier()  # every rank checks before any rank writes
        if ranks.rank == 0 or not ranks.coordinated:
            req.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(req.out / MANIFEST, json.dumps(settings, indent=1, ensure_ascii=False))
            write_prompts(req.out / PREPARED_PROMPTS, source)
        if ranks.rank == 0:
            cut = count_truncated(pipe, source.prompts)
            if cut["clip"] or (use_t5 and cut["t5"]):
                print(f"prepare: {cut['clip']} of {len(source)} prompts are longer than CLIP's {clip_length(pipe)} "
                      f"tokens and {cut['t5'] if use_t5 else 0} longer than T5's; the tokenizers truncate them")
        ranks.barrier()
        layout = StoreLayout.plan(source.prompts, req.shard_size)
        mine = sum(len(layout.shard_prompts(s)) for s in layout.shards_for_rank(ranks.rank, ranks.world))
        bar = tqdm(total=mine, desc="prompt embeddings", unit="prompt", disable=not req.progress or ranks.rank != 0)
        store_dir = req.out / "embeds"
        written = write_shards(lambda ps: encode_prompts(pipe, ps, use_t5=use_t5, device=ranks.device), layout,
                               store_dir, fp, DTYPES[req.dtype], req.batch, ranks.rank, ranks.world, bar.update)
        bar.close()
        free_encoders(pipe)
        ranks.barrier()
        _write_index(lambda: write_index(store_dir, layout, fp, DTYPES[req.dtype], clip_length(pipe), use_t5,
                                         extra={"teacher": req.teacher}), ranks)
        ranks.barrier()
        if ranks.rank == 0 or not ranks.coordinated:
            who = f" by rank {ranks.rank}" if ranks.world > 1 else ""
            print(f"prepare: embeddings of {len(layout.prompts)} prompts in {store_dir} "
                  f"({layout.num_shards} shards, {len(written)} written now{who})")
        if req.trajectories:
            _prepare_trajectories(req, settings["trajectories"], source.prompts, store_dir, fp, ranks)
    finally:
        ranks.close()
    return req.out


def _write_index(write: Callable[[], Path], ranks: _Ranks) -> bool:
    """Write an index once every shard exists: rank 0 after the barrier, or, with ranks run as
    separate calls (no process group), whichever call finds every shard finished. Returns whether
    it was written."""
    if ranks.coordinated:
        if ranks.rank == 0:
            write()
        return ranks.rank == 0
    try:
        write()
    except RuntimeError as e:
        print(f"prepare: rank {ranks.rank} done; {e} (the index is written by the call that finishes the last shard)")
        return False
    return True


def _meta_transformer(config):
    """The teacher's transformer class on the meta device: its config, no weights."""
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel.from_config(config)


def _settings(req: PrepareRequest, cfg, prompts: list[str], tr_cfg, vae_cfg, side: int, fp: str, use_t5: bool,
              shift: float) -> dict:
    """``prepare.json``: every input that changes what is written (compared on ``--resume``)."""
    from .models.pipeline_io import is_local_path
    from .text.store import prompts_hash

    local = is_local_path(req.teacher)
    return {"format": PREPARE_FORMAT,
            "teacher": str(Path(req.teacher).expanduser().resolve()) if local else req.teacher,
            "revision": None if local else req.revision,
            "prompts": req.prompts if req.prompts == "shapes" else str(Path(req.prompts).expanduser().resolve()),
            "prompt_column": req.prompt_column, "num_prompts": len(prompts), "prompts_sha": prompts_hash(prompts),
            "seed": cfg.runtime.seed if req.prompts == "shapes" else None,
            "resolution": side * 2 ** (len(vae_cfg["block_out_channels"]) - 1), "latent_side": side,
            "dtype": req.dtype, "shard_size": req.shard_size, "use_t5": use_t5, "fingerprint": fp,
            "trajectories": _trajectory_settings(cfg, tr_cfg, side, shift) if req.trajectories else None}


def _trajectory_settings(cfg, tr_cfg, side: int, shift: float) -> dict:
    """Everything that changes the teacher's states (what ``distill`` keys its trajectory bank on)."""
    tc = cfg.trajectory
    return {"schedule": cfg.student_schedule(shift), "teacher_steps": tc.teacher_steps, "guidance": cfg.guidance,
            "shift": shift, "seed": cfg.runtime.seed, "num_trajectories": tc.num_trajectories,
            "shape": [int(tr_cfg["in_channels"]), side, side]}


def _prepare_trajectories(req: PrepareRequest, settings: dict, prompts: list[str], store_dir: Path, fp: str,
                          ranks: _Ranks) -> None:
    """Teacher CFG trajectories from the stored embeddings, this rank's shards, then the index."""
    import torch
    from diffusers import SD3Transformer2DModel
    from tqdm.auto import tqdm

    from . import flow
    from .data.trajectories import write_trajectory_index, write_trajectory_shards
    from .distill.trajectory import teacher_schedule, teacher_trajectories
    from .sampling import make_noise
    from .text.store import DTYPES, EmbeddingStore, StoredConditioner

    n = settings["num_trajectories"]
    bank_prompts = [prompts[m % len(prompts)] for m in range(n)]
    cond = StoredConditioner(EmbeddingStore(store_dir, fingerprint=fp), dtype=torch.float32)
    teacher = SD3Transformer2DModel.from_pretrained(req.teacher, subfolder="transformer", revision=req.revision)
    # held in a dict that is cleared once the shards are written, so the teacher is freed before the barrier
    held = {"teacher": teacher.to(ranks.device).eval().requires_grad_(False)}
    del teacher
    student = flow.Schedule.from_step_times(settings["schedule"])
    sched, record = teacher_schedule(student, settings["teacher_steps"], settings["shift"])
    seed = derive_seed(settings["seed"], 17)
    shape = tuple(settings["shape"])
    dev = ranks.device

    def build(first: int, ps: list[str]) -> torch.Tensor:
        noise = make_noise(shape, [seed + first + m for m in range(len(ps))], device=dev)
        return teacher_trajectories(held["teacher"], noise, sched, record, cond.full(ps, dev),
                                    cond.uncond(len(ps), dev), settings["guidance"])

    folder = req.out / "trajectories"
    dtype = DTYPES[req.dtype]
    shards = -(-n // req.shard_size)
    mine = sum(min(n, (s + 1) * req.shard_size) - s * req.shard_size for s in range(ranks.rank, shards, ranks.world))
    bar = tqdm(total=mine, desc="teacher trajectories", unit="traj", disable=not req.progress or ranks.rank != 0)
    write_trajectory_shards(build, bank_prompts, folder, settings, req.shard_size, dtype, req.batch, ranks.rank,
                            ranks.world, bar.update)
    bar.close()
    held.clear()
    ranks.barrier()
    if _write_index(lambda: write_trajectory_index(folder, bank_prompts, settings, student, req.shard_size, dtype),
                    ranks):
        print(f"prepare: {n} teacher trajectories in {folder}")
    ranks.barrier()


# -- command line ----------------------------------------------------------------------------------

def register(sub) -> dict[str, Callable]:
    """Add ``sd35flash prepare``; returns ``{command: handler}`` for ``cli.COMMANDS``."""
    from . import args as A

    p = sub.add_parser("prepare", help="precompute prompt embeddings (and teacher trajectories) for distillation")
    p.add_argument("--teacher", required=True, help="teacher SD3 pipeline folder or hub id")
    p.add_argument("--revision", help="hub revision of --teacher")
    p.add_argument("--prompts", required=True, help="shapes, or a .txt / .jsonl / .parquet prompt file")
    p.add_argument("--prompt-column", help="the text column of a .parquet file (default: prompt, else text)")
    p.add_argument("--out", required=True, help="folder for prepare.json, prompts.jsonl, embeds/, trajectories/")
    p.add_argument("--resolution", type=A.resolution,
                   help="image size in pixels (default: the model's; 512 or 1024 for SD3.5)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="stored precision (default bf16)")
    p.add_argument("--batch", type=A.integer("--batch", 1, A.MAX_BATCH), default=32, help="prompts per encoder batch")
    p.add_argument("--shard-size", type=A.integer("--shard-size", 1, A.MAX_COUNT), default=256,
                   help="prompts per shard file")
    p.add_argument("--no-t5", action="store_true", help="never load T5 (zeros in its slots)")
    p.add_argument("--trajectories", action="store_true",
                   help="also write the recipe's teacher trajectories (trajectory guidance)")
    p.add_argument("--preset", default="default", help="distill recipe: smoke | quick | default")
    p.add_argument("--config", help="a YAML distill config instead of a preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe value, e.g. --set num_prompts=10000 (repeatable)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted prepare (finished shards are kept)")
    p.add_argument("--no-progress", action="store_true")
    return {"prepare": cmd_prepare}


def cmd_prepare(args: argparse.Namespace) -> int:
    from .config import parse_overrides

    req = PrepareRequest(teacher=args.teacher, prompts=args.prompts, out=Path(args.out), resolution=args.resolution,
                         dtype=args.dtype, batch=args.batch, shard_size=args.shard_size, resume=args.resume,
                         preset=args.preset, config=args.config, overrides=parse_overrides(args.overrides),
                         prompt_column=args.prompt_column, use_t5=not args.no_t5, trajectories=args.trajectories,
                         revision=args.revision, progress=not args.no_progress)
    out = prepare(req)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"prepared: {out}")
    return 0
