"""``sd35flash study create``: draw every prompt with every model, with the same seeds.

Image ``(prompt i, seed k)`` uses seed ``base + i * S + k`` for every model, so the two images of a
pair differ only by the model. Generation is resumable: ``plan.json`` fixes the study first, each
image is written atomically as soon as its batch is done, and a rerun skips the images on disk. The
manifest (models, prompts, pairs) is written last.

On the shapes world every prompt also gets a **gold pair**: the ground-truth render of its spec
against a render of a mismatched spec (one attribute changed, :func:`~sd35flash.world.selftest.perturb`),
kept only when the judge accepts the first and rejects the second.
"""

from __future__ import annotations

import gc
import itertools
import json
import random
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..imaging import save_png
from ..io import atomic_write_text, check_model_output
from .folder import FORMAT_VERSION, IMAGES, PLAN, TIMING, StudyFolder, image_name, read_json

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
_MODEL_ARG = re.compile(r"^(?P<model>.+?)(?::(?P<steps>[^:]*)(?::(?P<guidance>[^:]*))?)?$")
GOLD_ATTEMPTS = 20


@dataclass
class ModelArg:
    """One ``--model NAME=MODEL[:steps[:guidance]]``; ``None`` means the folder's own setting.
    ``schedule`` (``--schedule NAME=SPEC``): sampling times as ``sd35flash eval --schedule`` takes them."""

    name: str
    model: str
    steps: int | None = None
    guidance: float | None = None
    schedule: str | None = None


def parse_model_arg(text: str) -> ModelArg:
    """``NAME=MODEL[:steps[:guidance]]`` -> :class:`ModelArg` (one-line :class:`UserError` if malformed)."""
    name, sep, rest = text.partition("=")
    if not sep or not _NAME.match(name) or not rest:
        raise UserError(f"--model expects NAME=MODEL[:steps[:guidance]] with a name of letters, digits, _ . -, "
                        f"got {text!r}")
    m = _MODEL_ARG.match(rest)
    assert m is not None
    steps = guidance = None
    if m["steps"] is not None:
        try:
            steps = int(m["steps"])
        except ValueError:
            raise UserError(f"--model {name}: steps must be an integer, got {m['steps']!r}") from None
        if not 1 <= steps <= 1000:
            raise UserError(f"--model {name}: steps must be in [1, 1000], got {steps}")
    if m["guidance"] is not None:
        try:
            guidance = float(m["guidance"])
        except ValueError:
            raise UserError(f"--model {name}: guidance must be a number, got {m['guidance']!r}") from None
        if not 0 <= guidance <= 100:  # also refuses nan and inf
            raise UserError(f"--model {name}: guidance must be in [0, 100], got {guidance}")
    return ModelArg(name, m["model"], steps, guidance)


def apply_schedule_args(models: list[ModelArg], texts: list[str]) -> list[ModelArg]:
    """``--schedule NAME=SPEC`` (repeatable) onto the named models; SPEC is ``scheduler``, ``uniform`` or a
    list of times such as ``1,0.9,0.75,0.5,0`` (checked here, before any model loads)."""
    from ..evaluate.evaluator import parse_schedule

    by_name = {m.name: m for m in models}
    for text in texts:
        name, sep, spec = text.partition("=")
        if not sep or not spec:
            raise UserError(f"--schedule expects NAME=SPEC (e.g. teacher4=1,0.9,0.75,0.5,0), got {text!r}")
        if name not in by_name:
            raise UserError(f"--schedule {name}: no --model has that name; models: {', '.join(by_name)}")
        parsed = parse_schedule(spec)
        m = by_name[name]
        if isinstance(parsed, list) and m.steps is not None and m.steps != len(parsed) - 1:
            raise UserError(f"--schedule {name}: {len(parsed) - 1} steps, but --model {name} asks for {m.steps}")
        m.schedule = spec
    return models


def _checked_model(m: ModelArg) -> ModelArg:
    """``m`` with a shipped name resolved to its folder; a local folder that does not exist is an error."""
    from ..models.pipeline_io import is_local_path
    from ..models.registry import resolve_model

    model = resolve_model(m.model) or m.model
    if is_local_path(model) and not Path(model).expanduser().is_dir():
        raise UserError(f"--model {m.name}: model folder {model} does not exist; pass a folder made by "
                        "`sd35flash pretrain` / `distill`, a shipped name or a hub id")
    return ModelArg(m.name, model, m.steps, m.guidance, m.schedule)


def load_prompts(source: str, num: int, seed: int = 0) -> list[dict[str, Any]]:
    """Prompts as ``{"id", "text", "category", "spec"}``.

    ``shapes``: ``num`` specs of the shapes world's test split (categories round-robin); a ``.jsonl``
    file: shapes-world specs; any other file: one prompt per line (no category, no gold pair)."""
    from ..world import canonical_prompt, read_jsonl, split_specs

    if source == "shapes":
        specs = split_specs("test", num, seed=seed)
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"prompt file {path} does not exist; pass a text file, a .jsonl spec file or 'shapes'")
        if path.suffix == ".jsonl":
            specs = read_jsonl(path)
        else:
            try:
                lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                raise UserError(f"cannot read prompt file {path} ({exc})") from None
            if not lines:
                raise UserError(f"prompt file {path} holds no prompts; write one prompt per line")
            return [{"id": f"p{i:04d}", "text": t, "category": None, "spec": None} for i, t in enumerate(lines)]
    if not specs:
        raise UserError(f"{source} holds no prompts")
    return [{"id": f"p{i:04d}", "text": canonical_prompt(s), "category": s.category, "spec": s.to_dict()}
            for i, s in enumerate(specs)]


def image_seed(base: int, prompt_index: int, seed_index: int, seeds: int) -> int:
    return base + prompt_index * seeds + seed_index


def _plan(models: list[ModelArg], prompts: list[dict], seeds: int, seed: int, preset: str | None) -> dict:
    # `schedule` only when set, so that studies created before it existed still resume
    entries = [{k: v for k, v in asdict(m).items() if k != "schedule" or v is not None} for m in models]
    return {"format": FORMAT_VERSION, "models": entries, "prompts": prompts, "seeds": seeds,
            "seed": seed, "preset": preset}


def _start(folder: StudyFolder, plan: dict) -> dict:
    """Write ``plan.json`` for a new study, or check that a resumed one is the same study."""
    path = folder.root / PLAN
    plan = json.loads(json.dumps(plan))  # the form it takes on disk (lists, not tuples)
    if path.is_file():
        old = read_json(path, "delete the folder or use another --out")
        salt = old.pop("salt", None) if isinstance(old, dict) else None
        if old != plan or not isinstance(salt, str):
            raise UserError(f"{folder.root} holds a different study (other models, prompts or seeds); "
                            "use another --out, or the same arguments to resume it")
        return {**plan, "salt": salt}
    if folder.root.exists() and (not folder.root.is_dir() or any(folder.root.iterdir())):
        raise UserError(f"{folder.root} exists and is not a study folder; pass a new or empty --out")
    full = {**plan, "salt": secrets.token_hex(16)}
    folder.images.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(full, indent=1))
    return full


def _load(m: ModelArg, preset: str | None, device: str, prompts: list[str]):
    """Load one model through the project's loaders; returns (pipe, schedule, steps, guidance, sampler
    kwargs). Under a preset every prompt of the job is encoded up front (the preset may free the text
    encoders after that)."""
    from ..models.branches import sampling_transformer
    from ..models.pipeline_io import load_pipeline
    from ..models.sampling_settings import resolve_sampling

    try:
        if preset:
            from ..deploy.runtime.pipeline import load_deployed
            from ..deploy.runtime.presets import get_preset

            dp = load_deployed(m.model, get_preset(preset), device=device, progress=False)
            pipe = dp.pipe
        else:
            from ..deploy.runtime.pipeline import resolve_device

            dp, pipe = None, load_pipeline(m.model, device=resolve_device(device))
        schedule, steps, guidance = resolve_sampling(pipe, m.model, m.steps, m.guidance)
        if m.schedule is not None:
            from ..evaluate.evaluator import apply_schedule

            schedule, steps = apply_schedule(pipe, m.schedule, m.steps, steps)
        extra = dp.generate_kwargs(prompts, guidance) if dp is not None else {}
        extra["transformer"] = sampling_transformer(pipe, m.model)
    except UserError as exc:
        raise UserError(f"model {m.name} ({m.model}) failed to load: {exc}") from None
    return pipe, schedule, steps, guidance, extra


def _generate_model(folder: StudyFolder, plan: dict, m: ModelArg, preset: str | None, device: str,
                    batch_size: int, progress: bool) -> dict:
    """Generate the missing images of one model; returns its manifest entry."""
    import torch
    from tqdm import tqdm

    from ..sampling import generate

    seeds = plan["seeds"]
    jobs = [(p["id"], p["text"], image_seed(plan["seed"], i, k, seeds), image_name(plan["salt"], m.name, p["id"], k))
            for i, p in enumerate(plan["prompts"]) for k in range(seeds)]
    todo = [j for j in jobs if not (folder.images / j[3]).is_file()]
    timing = _read_timing(folder)
    pipe, schedule, steps, guidance, extra = _load(m, preset, device, sorted({j[1] for j in todo}))
    entry = {"model": m.model, "steps": steps, "guidance": guidance, "nfe": steps * (2 if guidance > 1.0 else 1),
             "schedule": [float(t) for t in schedule], "preset": preset}
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"study {m.name}", disable=not progress)
    times: list[tuple[float, int]] = []
    if todo:  # warm-up (one image, not kept) so that the timed batches measure steady-state speed
        with torch.inference_mode():
            generate(pipe, [todo[0][1]], [todo[0][2]], schedule, guidance=guidance, batch_size=1, **extra)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        t0 = time.perf_counter()
        with torch.inference_mode():
            imgs = generate(pipe, [c[1] for c in chunk], [c[2] for c in chunk], schedule, guidance=guidance,
                            batch_size=batch_size, **extra)
        times.append((time.perf_counter() - t0, len(chunk)))
        for c, img in zip(chunk, imgs):
            save_png(folder.images / c[3], img)
        bar.update(len(chunk))
    bar.close()
    if times:
        timing[m.name] = sum(t for t, _ in times) / sum(n for _, n in times)
        atomic_write_text(folder.root / TIMING, json.dumps(timing, indent=1))
    entry["seconds_per_image"] = timing.get(m.name)
    del pipe, extra
    gc.collect()
    return entry


def _read_timing(folder: StudyFolder) -> dict[str, float]:
    path = folder.root / TIMING
    return read_json(path, "delete it to measure again") if path.is_file() else {}


def gold_images(spec_dict: dict, seed: int) -> tuple[Any, Any, str] | None:
    """(truth render, mismatched render, what was changed) for one shapes-world spec, or ``None``
    when no mismatch the judge can tell apart is found in :data:`GOLD_ATTEMPTS` tries."""
    from ..world import SceneSpec, judge, render, render_with_layout
    from ..world.selftest import perturb

    spec = SceneSpec.from_dict(spec_dict)
    truth, placed = render_with_layout(spec, seed)
    if not judge(truth, spec).correct:
        return None
    rng = random.Random(seed)
    for _ in range(GOLD_ATTEMPTS):
        kind, wrong_spec = perturb(spec, placed, rng)
        wrong = render(wrong_spec, seed)
        if not judge(wrong, spec).correct:
            return truth, wrong, kind
    return None


def build_pairs(plan: dict, names: list[str], rng: random.Random) -> list[dict]:
    """Every unordered model pair on every (prompt, seed), each in a random a/b order."""
    pairs = []
    for p in plan["prompts"]:
        for k in range(plan["seeds"]):
            for a, b in itertools.combinations(names, 2):
                if rng.random() < 0.5:  # no model sits on side "a" more often than another
                    a, b = b, a
                pairs.append({"pair_id": secrets.token_hex(6), "kind": "model", "prompt_id": p["id"], "seed_index": k,
                              "a": a, "b": b, "img_a": image_name(plan["salt"], a, p["id"], k),
                              "img_b": image_name(plan["salt"], b, p["id"], k), "correct": None})
    rng.shuffle(pairs)
    return pairs


def _gold_pairs(folder: StudyFolder, plan: dict, rng: random.Random) -> list[dict]:
    pairs = []
    for i, p in enumerate(plan["prompts"]):
        if p.get("spec") is None:
            continue
        seed = image_seed(plan["seed"], i, 0, plan["seeds"])
        truth_name = image_name(plan["salt"], "gold-truth", p["id"])
        wrong_name = image_name(plan["salt"], "gold-wrong", p["id"])
        if not ((folder.images / truth_name).is_file() and (folder.images / wrong_name).is_file()):
            made = gold_images(p["spec"], seed)
            if made is None:
                continue
            save_png(folder.images / truth_name, made[0])
            save_png(folder.images / wrong_name, made[1])
        truth_first = rng.random() < 0.5
        a, b = (truth_name, wrong_name) if truth_first else (wrong_name, truth_name)
        pairs.append({"pair_id": secrets.token_hex(6), "kind": "gold", "prompt_id": p["id"], "seed_index": 0,
                      "a": "truth" if truth_first else "mismatch", "b": "mismatch" if truth_first else "truth",
                      "img_a": a, "img_b": b, "correct": "a" if truth_first else "b"})
    return pairs


def create_study(models: list[ModelArg], prompts: str, out: str | Path, seeds: int = 4, num_prompts: int = 32,
                 seed: int = 0, preset: str | None = None, device: str = "auto", batch_size: int = 16,
                 progress: bool = True) -> Path:
    """Create (or resume) the study in ``out``; returns the manifest path."""
    from ..paths import git_commit

    if len(models) < 2:
        raise UserError("a study compares at least two models; pass --model NAME=MODEL twice or more")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise UserError(f"model names must differ, got {names}")
    if seeds < 1 or num_prompts < 1 or batch_size < 1:
        raise UserError("--seeds, --num-prompts and --batch-size must be >= 1")
    check_model_output(out, "--out", marker=PLAN, kind="study")  # writable; an existing folder only when it is a study
    models = [_checked_model(m) for m in models]  # before anything is written
    folder = StudyFolder(out)
    plan = _start(folder, _plan(models, load_prompts(prompts, num_prompts, seed), seeds, seed, preset))
    if folder.manifest_path.is_file():  # finished earlier with the same arguments
        folder.manifest()
        return folder.manifest_path
    entries = {m.name: _generate_model(folder, plan, m, preset, device, batch_size, progress) for m in models}
    rng = random.Random(plan["salt"])
    pairs = build_pairs(plan, names, rng) + _gold_pairs(folder, plan, rng)
    manifest = {"format": FORMAT_VERSION, "commit": git_commit(), "models": entries, "prompts": plan["prompts"],
                "seeds": plan["seeds"], "images": IMAGES, "pairs": pairs}
    atomic_write_text(folder.manifest_path, json.dumps(manifest, indent=1))
    return folder.manifest_path
