"""``sd35flash distill``: resolve the teacher, prompts and work folder, build the banks, train, export.

The work folder (checkpoints, TensorBoard logs, ``metrics.jsonl``, sample grids) is
``<cache>/distill/<out name>-<fingerprint>``, keyed by the config, the teacher, the prompt source
and the output folder. A run with checkpoints there is continued only with ``resume=True``; a
finished run (``trained.json``) is exported again without training. ``from_work`` names the work
folder of an earlier run of the same config, to continue it or to export its finished student to
another output folder (``distill --from-work``).
Teacher trajectories are cached in ``<cache>/trajectories/`` and reused by every later run with the
same teacher, prompts and settings.

``prepared`` (``distill --prepared DIR``) reads what ``sd35flash prepare`` wrote: the prompts and
their embeddings (the text encoders are then never loaded for training; export loads them to write
a complete folder) and, when the folder holds trajectories built with this recipe's settings, the
teacher trajectories. The folder must have been prepared for this teacher at this resolution.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import fingerprint, from_dict, to_dict
from ..errors import ConfigError, NonFiniteError, TrainingAlarm, UserError
from ..io import atomic_write_json, check_model_output, clean_stale, copy_dir, read_text
from ..models.branches import PRESPLIT_SUBFOLDER, branch_infos
from ..models.merge import merged_transformer
from ..models.student_folder import export_student, student_info
from ..models.student_info import SplitInfo
from ..paths import cache_root
from ..train.checkpoint import CheckpointManager, read_meta
from ..train.runtime import make_accelerator
from ..train.sharding import make_sharding
from .adversarial import resolve_blocks
from .config import DistillConfig, MemoryConfig
from .memory_check import check_distill_fits
from .models import DistillModels
from .prompts import PromptSource, load_prompts
from .real import RealBank, RenderBank, from_renders, from_teacher
from .trainer import DistillTrainer
from .trajectory import TrajectoryBank, build_bank, cache_key, load_or_build, teacher_identity

#: Written in the work folder when training finished (before the export), so a rerun only exports.
TRAINED = "trained.json"
#: The subfolder of a LoRA-mode student folder holding the student adapter alone (``load_lora_weights``).
LORA_SUBFOLDER = "student_lora"


def default_teacher() -> Path:
    """The teacher used when ``--teacher`` is not given: the shipped default teacher (verified against
    its checksums), else the one ``sd35flash pretrain`` (default preset) cached; UserError if neither."""
    from ..models.registry import default_teacher as shipped_teacher
    from ..models.registry import verify_asset
    from ..toy_teacher import is_finished, load_pretrain_config, teacher_dir

    shipped = shipped_teacher()
    if shipped is not None:
        return verify_asset(shipped)
    folder = teacher_dir(load_pretrain_config("default"), "default") / "pipeline"
    if not is_finished(folder):
        raise UserError("no --teacher given, no teacher is shipped and no default teacher is cached; run "
                        "`sd35flash pretrain --out DIR` first, or pass --teacher DIR_OR_HUB_ID")
    return folder


def resolve_guidance(cfg: DistillConfig, teacher: str) -> DistillConfig:
    """``cfg`` with ``guidance: None`` replaced by the teacher's recommended guidance (its shipped
    registry entry's), else ``TEACHER_DEFAULT_GUIDANCE``; so a student distils the teacher as it is
    meant to be sampled. A set guidance is kept."""
    if cfg.guidance is not None:
        return cfg
    from ..models.registry import settings_for_folder
    from ..models.sampling_settings import TEACHER_DEFAULT_GUIDANCE

    shipped = settings_for_folder(teacher) if Path(teacher).expanduser().is_dir() else None
    g = shipped.guidance if shipped is not None else TEACHER_DEFAULT_GUIDANCE
    return dataclasses.replace(cfg, guidance=float(g))


RECIPE_KEYS = {"": ["grad_variance_every", "grad_variance_batches", "keep_presplit_checkpoint"],
               "trajectory": ["loss"], "dmd": ["tau", "noise"], "student": ["keep_at"],
               "fake": ["warmup_steps", "mixture", "match_student_conditioning"],
               "gan": ["backbone_weight", "pool", "loss", "tau", "reinit", "paired"]}


def work_dir(cfg: DistillConfig, teacher_id: str, prompts: str, out: Path) -> Path:
    """``<cache>/distill/<out name>-<fingerprint>``. A config without stage 2 (``split.steps: 0``)
    leaves the ``split`` section out of the fingerprint, one with the default ``memory`` section
    leaves that out, one in ``mode: full`` leaves out ``mode`` and ``lora``, ``sharding: ddp`` and
    ``resolution: 0`` are left out, and so are the recipe
    options (``RECIPE_KEYS``) at their defaults, so their folders are the ones earlier versions used."""
    conf = to_dict(cfg)
    if cfg.split.steps == 0:
        conf.pop("split")
    if conf["memory"] == to_dict(MemoryConfig()):
        conf.pop("memory")
    if cfg.mode == "full":
        conf.pop("mode")
        conf.pop("lora")
    for key, default in (("sharding", "ddp"), ("resolution", 0)):
        if conf[key] == default:
            conf.pop(key)
    defaults = to_dict(DistillConfig())
    for section, keys in RECIPE_KEYS.items():
        for k in keys:
            sub = conf if section == "" else conf[section]
            if sub.get(k) == (defaults if section == "" else defaults[section])[k]:
                sub.pop(k)
    key = fingerprint({"config": conf, "teacher": teacher_id, "prompts": prompts, "out": str(out)})
    return cache_root() / "distill" / f"{out.name}-{key}"


def init_from(source: Path, work: Path, cfg: DistillConfig, teacher: str, prompts: str) -> Path:
    """Copy the end-of-stage-1 checkpoint of the distillation run in work folder ``source`` into
    ``work``, so that this run starts at stage 2 (split-timestep) instead of redoing stages 0-1.

    ``source`` must hold a run of this config up to its ``split`` section (same teacher, prompts,
    stage 0-1 settings and seed) whose newest checkpoint is the end of stage 1. The copy is atomic.
    Returns the copied checkpoint."""
    source = Path(source).expanduser()
    if not (source / "config.json").is_file():
        raise UserError(f"--init-from {source} is not a distillation work folder (no config.json); pass the "
                        "folder `sd35flash distill` printed as 'work folder'")
    if cfg.split.steps == 0:
        raise UserError("--init-from starts stage 2 from a finished stage 1; this config has split.steps 0")
    diff = config_differences(source, cfg, teacher, prompts, ignore_split=True)
    if diff:
        raise UserError(f"--init-from {source} was run with a different config ({', '.join(diff[:5])}); "
                        "only the split section may differ")
    end = cfg.stage1_step(cfg.student.steps)
    stage1_end = CheckpointManager(source / "checkpoints").at_step(end)
    if stage1_end is None:
        raise UserError(f"--init-from {source} has no checkpoint at the end of stage 1 (step {end}): finish "
                        "stage 1 of that run (`sd35flash distill ... --resume`); a run made before "
                        "keep_presplit_checkpoint pruned it once stage 2 went on")
    if any((work / "checkpoints").glob("ckpt-*")):
        raise UserError(f"{work} already has checkpoints; pass --resume instead of --init-from")
    return copy_dir(stage1_end, work / "checkpoints" / stage1_end.name, "checkpoint")


def read_work_config(work: Path) -> tuple[dict, DistillConfig]:
    """(``config.json`` of distillation work folder ``work``: its teacher and prompts, the run's config)."""
    meta_file = work / "config.json"
    if not meta_file.is_file():
        raise UserError(f"{work} is not a distillation work folder (no config.json); pass the folder "
                        "`sd35flash distill` printed as its work folder")
    meta = json.loads(meta_file.read_text())
    return meta, from_dict(DistillConfig, meta["config"], where=str(meta_file))


def config_differences(source: Path, cfg: DistillConfig, teacher: str, prompts: str,
                       ignore_split: bool = False) -> list[str]:
    """Dotted keys whose values differ between the run recorded in work folder ``source`` and this one."""
    try:
        theirs = json.loads(read_text(source / "config.json", "work folder config"))
    except json.JSONDecodeError:
        raise UserError(f"{source}/config.json is not valid JSON; this is not a usable work folder") from None
    if isinstance(theirs.get("config"), dict):  # fill in options added since that run, at their defaults
        theirs["config"] = to_dict(from_dict(DistillConfig, theirs["config"], where=str(source / "config.json")))
    mine = {"config": to_dict(cfg), "teacher": teacher, "prompts": prompts}
    for side in (theirs, mine):
        if ignore_split:
            side.get("config", {}).pop("split", None)
        config = side.get("config", {})
        if isinstance(config, dict) and config.get("mode", "full") == "full":  # folders from before LoRA mode
            config.pop("mode", None)
            config.pop("lora", None)
        if isinstance(side.get("teacher"), str) and Path(side["teacher"]).expanduser().exists():
            side["teacher"] = str(Path(side["teacher"]).expanduser().resolve())
    return _differences(theirs, mine)


def total_steps(cfg: DistillConfig) -> int:
    """Global steps of a complete run: stage 0, the fake warm-up, stage 1, and stage 2 when ``split.steps > 0``."""
    return cfg.trajectory.steps + cfg.fake.warmup_steps + cfg.student.steps + max(cfg.split.steps, 0)


def is_trained(work: Path, cfg: DistillConfig) -> bool:
    """True when the run in ``work`` finished training (``trained.json``, or a checkpoint at its last step)."""
    if (work / TRAINED).is_file():
        return True
    latest = CheckpointManager(work / "checkpoints").latest(quiet=True)  # the trainer's load warns, once
    try:
        return latest is not None and int(read_meta(latest)["step"]) >= total_steps(cfg)
    except (OSError, ValueError, KeyError):
        return False


def check_from_work(source: Path, cfg: DistillConfig, teacher: str, prompts: str) -> Path:
    """Validate ``--from-work``: a work folder of a run of exactly this config, teacher and prompts."""
    source = Path(source).expanduser()
    if not (source / "config.json").is_file():
        raise UserError(f"--from-work {source} is not a distillation work folder (no config.json); pass the "
                        "folder `sd35flash distill` printed as 'work folder'")
    diff = config_differences(source, cfg, teacher, prompts)
    if diff:
        raise UserError(f"--from-work {source} was run with a different config ({', '.join(diff[:5])}); pass the "
                        "same --preset/--config/--set, --teacher and --prompts as that run")
    return source.resolve()


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} vs {vb!r}")
    return out


def trajectory_bank(cfg: DistillConfig, models: DistillModels, source: PromptSource, teacher_id: str,
                    work: Path, acc, progress: bool, prepared=None) -> TrajectoryBank:
    """Build (main process) or reuse the cached teacher trajectories; every process then loads them.
    A prepare folder holding trajectories (``prepared``) must have been built with these settings."""
    tc = cfg.trajectory
    if prepared is not None and prepared.settings.get("trajectories") is not None:
        from ..data.prepared import open_prepared

        settings = {"schedule": cfg.student_schedule(models.shift), "teacher_steps": tc.teacher_steps,
                    "guidance": cfg.guidance, "shift": models.shift, "seed": cfg.runtime.seed,
                    "num_trajectories": tc.num_trajectories, "shape": list(models.latent_shape())}
        store = open_prepared(prepared.folder, trajectory_settings=settings).trajectories
        return TrajectoryBank(prompts=list(store.prompts), states=store.states, schedule=list(store.schedule))
    n = tc.num_trajectories
    prompts = [source.prompts[m % len(source)] for m in range(n)]
    schedule = cfg.student_schedule(models.shift)
    settings = {"schedule": schedule, "teacher_steps": tc.teacher_steps, "guidance": cfg.guidance,
                "shift": models.shift, "seed": cfg.runtime.seed, "shape": list(models.latent_shape())}
    if cfg.memory.teacher_dtype != "fp32":  # a 16-bit teacher draws other trajectories
        settings["teacher_dtype"] = cfg.memory.teacher_dtype
    key = cache_key(teacher_id, prompts, settings)
    path = (cache_root() / "trajectories" if tc.cache else work) / f"{key}.pt"
    dev = acc.device

    def build() -> TrajectoryBank:
        models.pipe.to(dev)
        bar = tqdm(total=n, desc="teacher trajectories", disable=not progress, leave=False)
        bank = build_bank(models.teacher, lambda ps: models.conditioner.full(ps, dev),
                          lambda b: models.conditioner.uncond(b, dev), prompts, schedule, tc.teacher_steps,
                          models.shift, cfg.guidance, models.latent_shape(), cfg.runtime.seed * 1_000_003 + 17,
                          batch_size=32, device=dev, progress=bar.update)
        bar.close()
        return bank

    if acc.is_main_process:
        _, reused = load_or_build(path, build)
        if reused:
            print(f"reusing cached teacher trajectories {path}")
    acc.wait_for_everyone()
    return load_or_build(path, build)[0]


def open_prepared_for(folder: str | Path, teacher: str, revision: str | None):
    """Open prepare folder ``folder`` for distilling ``teacher``: it must have been prepared for that
    teacher (same local folder, or hub id and revision), else a one-line error."""
    from ..data.prepared import open_prepared
    from ..models.pipeline_io import is_local_path

    prep = open_prepared(folder)
    theirs = prep.settings.get("teacher")
    local = is_local_path(teacher)
    mine = str(Path(teacher).expanduser().resolve()) if local else teacher
    if theirs != mine or (not local and prep.settings.get("revision") != revision):
        raise UserError(f"--prepared {folder} was prepared for teacher {theirs} (encoder fingerprint "
                        f"{prep.settings.get('fingerprint')}), not {mine}; "
                        f"run `sd35flash prepare --teacher {teacher}` first")
    return prep


def check_prepared_side(prep, models: DistillModels) -> None:
    """The prepare folder's resolution must be the run's (its trajectories and resolution record)."""
    side = prep.settings.get("latent_side")
    if side is not None and int(side) != models.side:
        raise UserError(f"--prepared {prep.folder} was prepared at {prep.settings.get('resolution')} px, this run "
                        f"trains at latent side {models.side}; pass --resolution {prep.settings.get('resolution')}")


def load_encoders(models: DistillModels, teacher: str, revision: str | None) -> None:
    """Put the teacher's text encoders into ``models.pipe`` (on the CPU) for export, after a run
    that trained from a prepare folder without them."""
    from ..models.pipeline_io import load_pipeline

    full = load_pipeline(teacher, revision=revision, transformer=None, vae=None)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        setattr(models.pipe, name, getattr(full, name, None))


def check_gan(cfg: DistillConfig, models: DistillModels, source: PromptSource) -> None:
    """Before any work: ``gan.blocks`` must exist in the teacher, and ``gan.real: renders`` needs specs."""
    if not cfg.gan.enabled:
        return
    try:
        resolve_blocks(cfg.gan.blocks, len(models.fake.transformer_blocks))
    except ValueError as e:
        raise ConfigError(f"{e}; choose gan.blocks within it") from None
    if cfg.gan.real == "renders" and source.specs is None:
        raise ConfigError("gan.real: renders needs --prompts shapes (a prompt file has no scenes to render); "
                          "use gan.real: teacher")


def real_bank(cfg: DistillConfig, models: DistillModels, source: PromptSource, bank: TrajectoryBank | None,
              acc) -> RealBank | RenderBank | None:
    if not cfg.gan.enabled:
        return None
    if cfg.gan.real == "teacher":
        return from_teacher(bank)
    size = models.side * 2 ** (len(models.pipe.vae.config.block_out_channels) - 1)
    models.pipe.to(acc.device)
    return from_renders(models.pipe.vae, source, cfg.gan.num_real, size, seed=7_000_000 + cfg.runtime.seed)


def split_outputs(cfg: DistillConfig, presplit, branches) -> tuple[SplitInfo, torch.nn.Module, dict]:
    """(``sd35flash.json``'s ``split`` record, the merged transformer, the extra subfolders to save)."""
    weights = cfg.split.weights()
    infos = branch_infos(cfg.split.boundaries)
    extras = {b.subfolder: m for b, m in zip(infos, branches)}
    if cfg.split.keep_presplit:
        extras[PRESPLIT_SUBFOLDER] = presplit
    split = SplitInfo(branches=infos, merge_weights=weights, unmerged=cfg.split.unmerged,
                      presplit=PRESPLIT_SUBFOLDER if cfg.split.keep_presplit else "")
    return split, merged_transformer(branches, weights), extras


def distill(cfg: DistillConfig, teacher: str | None, out: Path, prompts: str | None = "shapes",
            revision: str | None = None, recipe: str = "", resume: bool = False, progress: bool = True,
            stop_at: int | None = None, init: str | Path | None = None, from_work: str | Path | None = None,
            force: bool = False, prepared: str | Path | None = None) -> Path:
    """Distil ``teacher`` into a ``cfg.student_steps``-step student saved at ``out``; returns ``out``.

    With stage 2 (``split.steps > 0``) the folder's ``transformer/`` is the merge of the branches at
    ``split``'s weights, and the branches (and the pre-split student) are kept as subfolders.

    ``stop_at`` stops after that global step with a checkpoint (raising ``StopTraining``); ``resume``
    continues from the newest checkpoint of the same run; ``init`` (a work folder) starts stage 2 from
    the end of stage 1 of another run of this config (:func:`init_from`); ``from_work`` uses that work
    folder of an earlier run of this config instead of the one keyed to ``out`` (continuing it, or,
    when it finished, exporting its student to ``out`` without training).

    ``out`` is checked before any work starts: it must be writable, and an existing folder is
    replaced only when it is a model folder or empty. Unless ``force``, a config the training-memory
    planner says will not fit on the visible devices is refused before anything loads
    (:func:`.memory_check.check_distill_fits`). ``prepared``: a ``sd35flash prepare`` folder to read
    the prompts, their embeddings and (when built with these settings) the trajectories from.
    """
    teacher = str(teacher) if teacher is not None else str(default_teacher())
    cfg = resolve_guidance(cfg, teacher)
    out = check_model_output(Path(out).expanduser().resolve())
    store = None
    if prepared is not None:
        if prompts not in (None, "shapes"):
            raise UserError("pass either --prompts or --prepared (a prepare folder brings its own prompts), not both")
        store = open_prepared_for(prepared, teacher, revision)
        prompts = f"prepared:{store.folder.resolve()}"
    prompts = prompts or "shapes"
    if from_work is not None and init is not None:
        raise UserError("pass either --from-work (continue or re-export a run) or --init-from (start stage 2), "
                        "not both")
    if from_work is not None:
        from_work = check_from_work(Path(from_work), cfg, teacher, prompts)
    if init is not None and not (Path(init).expanduser() / "config.json").is_file():
        raise UserError(f"--init-from {init} is not a distillation work folder (no config.json); pass the "
                        "folder `sd35flash distill` printed as 'work folder'")
    if cfg.resolution:  # before anything loads: the teacher's configs say which sizes it takes
        from ..models.resolution import geometry_configs, latent_side

        latent_side(*geometry_configs(teacher, revision), cfg.resolution)
    if not force:
        check_distill_fits(cfg, teacher)
    source = store.prompts() if store is not None else load_prompts(prompts, cfg.num_prompts, seed=cfg.runtime.seed)
    teacher_id = teacher_identity(teacher, revision)
    work = from_work if from_work is not None else work_dir(cfg, teacher_id, prompts, out)
    trained = is_trained(work, cfg)
    if trained:
        print(f"distill: the run in {work} finished training; exporting its student without training")
    elif any(work.glob("checkpoints/ckpt-*")) and not (resume or from_work is not None):
        raise UserError(f"an unfinished distillation run for this config exists in {work}; pass --resume to "
                        "continue it, or delete that folder to start over")
    acc = make_accelerator(cfg.runtime, work)
    # before the models: under FSDP2 only process 0 loads the teacher's weights (models.py)
    models = DistillModels.for_config(cfg, teacher, revision, encoders=store is None,
                                      sharding=make_sharding(cfg.sharding, acc))
    if store is not None:
        check_prepared_side(store, models)
        models.conditioner = store.conditioner(torch.float32)
    cfg.branch_steps(models.shift)  # a split branch without student steps fails here, before any work
    check_gan(cfg, models, source)
    if acc.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        if init is not None and not any(work.glob("checkpoints/ckpt-*")):  # with --resume: continue this run
            print(f"distill: starting stage 2 from {init_from(Path(init), work, cfg, teacher, prompts)}")
        atomic_write_json(work / "config.json", {"config": to_dict(cfg), "teacher": teacher, "prompts": prompts})
        print(f"distill: work folder {work}")
    acc.wait_for_everyone()
    needs_bank = cfg.trajectory.steps > 0 or (cfg.gan.enabled and cfg.gan.real == "teacher")
    bank = trajectory_bank(cfg, models, source, teacher_id, work, acc, progress, store) if needs_bank else None
    real = real_bank(cfg, models, source, bank, acc)
    trainer = DistillTrainer(cfg, models, source, work, acc, bank=bank, real=real, progress=progress, stop_at=stop_at)
    try:
        student = trainer.run()
        branches = trainer.branch_results()
        if acc.is_main_process and not trained:
            atomic_write_json(work / TRAINED, {"step": total_steps(cfg)})
        sharding = trainer.method.sharding  # every process takes part in gathering sharded weights
        student, branches = sharding.gathered(student), [sharding.gathered(b) for b in branches]
        models.unpark_encoders()  # export saves the teacher's encoders
        if acc.is_main_process and store is not None:
            load_encoders(models, teacher, revision)
        if acc.is_main_process:
            with tempfile.TemporaryDirectory() as tmp:
                files = {f"{LORA_SUBFOLDER}/{name}": data for name, data in models.adapter_files(student, tmp).items()}
            student, branches = models.plain(student), [models.plain(b) for b in branches]
            split, merged, extras = None, student, {}
            if branches:
                split, merged, extras = split_outputs(cfg, student, branches)
            info = student_info(cfg.student_schedule(models.shift), teacher, recipe, needs_t5=cfg.t5_dropout == 0.0,
                                extra={"config": to_dict(cfg), "prompts": prompts, "world_size": acc.num_processes,
                                       "work_dir": str(work)}, split=split)
            try:
                export_student(models.pipe, merged, out, info, extra_transformers=extras, extra_files=files)
            except UserError as e:
                raise UserError(f"{e}; the trained run is kept: export it with the same command and "
                                f"--out NEW_FOLDER --from-work {work}") from None
        acc.wait_for_everyone()
    except (TrainingAlarm, NonFiniteError) as exc:
        raise CheckpointManager(work / "checkpoints").alarm(exc, acc.is_main_process) from None
    finally:
        acc.end_training()
        acc.free_memory()
        acc._custom_objects.clear()
    return out
