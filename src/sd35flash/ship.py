"""Turn a trained pipeline folder into a model shipped with the package.

``python -m sd35flash.ship SRC --name shapes-v1 --eval-dir DIR`` writes
``sd35flash/assets/teachers/shapes-v1/`` and its entry in ``assets/models.json``
(:mod:`sd35flash.models.registry`):

1. the pipeline re-saved with 16-bit safetensors (``--dtype float16`` by default; weights whose
   magnitude fp16 cannot hold are refused), plus ``pretrain.json``, the run's ``training/`` logs and
   the evaluation JSONs of ``--eval-dir`` under ``eval/``;
2. a storage check: the same prompts and seeds sampled from SRC (fp32) and from the 16-bit folder
   (loaded as sd35flash loads it, in fp32) must differ by at most ``--max-pixel-diff`` (mean
   absolute difference in 0-255 pixel levels) and get the same judge verdicts;
3. a size check (``--max-mb``, 40 by default, counted in 10^6 bytes);
4. the model card ``README.md`` (config, training command, commit, machine, steps, wall time, the
   metrics table of the evaluation JSONs, the guidance to use) and ``checksums.sha256``.

An existing version is never replaced unless ``--replace`` is given: a new asset gets a new name.
``--supersede OLD`` then takes the version it improves on out of the package (one versioned folder
per model ships): OLD's folder is deleted from the tree and its registry entry moves to ``retired``
with the git commit that holds it. That is refused unless OLD is committed, unmodified, in git, so
the only copy of a model is never deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from .errors import UserError
from .evaluate.teacher_table import metrics_table, read_evals
from .io import replace_dir
from .models.pipeline_io import load_pipeline, save_pipeline
from .models.registry import (
    RetiredModel,
    ShippedModel,
    assets_root,
    find_shipped,
    list_models,
    list_retired,
    write_checksums,
    write_registry,
)
from .sampling import generate, scheduler_schedule
from .sizes import folder_bytes
from .world import canonical_prompt, judge, split_specs

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: Prompts of the storage check: one of each category, from the val split's generator.
CHECK_SEED = 7


def storage_check(src_pipe, stored: Path, steps: int, guidance: float, n: int) -> dict:
    """Sample ``n`` val specs (one per category in turn) from ``src_pipe`` and from the folder
    ``stored`` (loaded in fp32) with the same seeds; return the pixel differences and verdicts."""
    specs = split_specs("val", n, seed=CHECK_SEED)
    prompts = [canonical_prompt(s) for s in specs]
    seeds = list(range(n))
    sched = scheduler_schedule(src_pipe, steps)
    with torch.inference_mode():
        a = generate(src_pipe, prompts, seeds, sched, guidance=guidance)
        b = generate(load_pipeline(stored), prompts, seeds, sched, guidance=guidance)
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    va = [judge(im, s).correct for im, s in zip(a, specs)]
    vb = [judge(im, s).correct for im, s in zip(b, specs)]
    return {"prompts": n, "steps": steps, "guidance": guidance, "mean_abs_pixel_diff": round(float(diff.mean()), 4),
            "max_abs_pixel_diff": int(diff.max()), "verdicts_agree": int(sum(x == y for x, y in zip(va, vb))),
            "judged_correct_src": int(sum(va)), "judged_correct_stored": int(sum(vb))}


def load_in_float32(folder: Path) -> None:
    """Make stock ``from_pretrained(folder)`` (no dtype) load the text encoders in float32, as diffusers
    loads the transformer and VAE: transformers loads a model in its config's ``dtype`` by default, and
    a pipeline with 16-bit encoders and a 32-bit transformer fails on its first call. Storage stays 16-bit."""
    for cfg_path in sorted(folder.glob("text_encoder*/config.json")):
        cfg = json.loads(cfg_path.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = "float32"
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def choose_guidance(evals: list[tuple[str, dict]], steps: int) -> float | None:
    """The guidance with the best ``val`` alignment at ``steps`` steps (None without val evaluations)."""
    val = [r for _, r in evals if r.get("split") == "val" and r.get("steps") == steps]
    if not val:
        return None
    return float(max(val, key=lambda r: r["alignment"]["overall"])["guidance"])


def model_card(name: str, info: dict, entry: ShippedModel, evals, check: dict, machine: str, wall: str,
               command: str) -> str:
    """The ``README.md`` of a shipped model."""
    snap = info.get("snapshot")
    steps_line = (f"{snap['step']} of {snap['of_steps']} flow steps (EMA weights of an unfinished run, checkpoint "
                  f"{snap['checkpoint']})" if snap else f"{info.get('config', {}).get('flow', {}).get('steps')} flow "
                  "steps (finished run, EMA weights)")
    vae = info.get("vae") or {}
    logs_line = ("`training/flow-metrics.jsonl` (`probe/*` = judged val probe), `training/vae-metrics.jsonl`"
                 if not info.get("config", {}).get("init") else
                 f"`training/flow-metrics.jsonl` (`probe/*` = judged val probe) for this stage; the stages it "
                 f"continued (`init: {info['config']['init']}`) under `training/init/` "
                 "(`python -m sd35flash.evaluate.training_curve FOLDER curve.png` plots them as one curve)")
    return f"""# {name}

A {entry.role} for the sd35flash shapes world: a standard diffusers `StableDiffusion3Pipeline` folder
({entry.dtype} safetensors, {entry.bytes / 1e6:.1f} MB in all).

## Use it

- Recommended: **{entry.steps} steps, guidance {entry.guidance}** (CFG, with the scheduler's own schedule).
- `sd35flash generate --model {name} "a red circle left of a blue square" --out x.png`
- `sd35flash distill --teacher {name} --out runs/student-4 --preset quick`
- Stock diffusers: `StableDiffusion3Pipeline.from_pretrained(path)` loads every part in float32 (the weights are
  stored in {entry.dtype}; pass `dtype=torch.float16` on a GPU), then `pipe(prompt, num_inference_steps={entry.steps},
  guidance_scale={entry.guidance})`.
- `sha256sum -c checksums.sha256` (inside this folder) checks every file; sd35flash checks them on every load
  by name.

## Training

- Command: `{command}`
- Commit: `{info.get('commit', 'unknown')}`
- Machine: {machine}
- Steps: {steps_line}
- Wall time: {wall}
- VAE: PSNR {vae.get('psnr', float('nan')):.2f} dB, judge accuracy on reconstructions
  {vae.get('judge_accuracy', float('nan')):.3f}
- Training curves: {logs_line}

## Metrics

Judge pass rates per category and FD (EfficientNet-Lite0) against renders of the same specs; the JSONs are in
`eval/`. The guidance was chosen on `val`.

{metrics_table(evals) if evals else "(no evaluations were given)"}

## 16-bit storage check

{check['prompts']} val prompts at {check['steps']} steps, guidance {check['guidance']}, same seeds, fp32 source vs this
folder: mean absolute pixel difference {check['mean_abs_pixel_diff']} (max {check['max_abs_pixel_diff']}) on the
0-255 scale; judge verdicts agree on {check['verdicts_agree']}/{check['prompts']}.

## Config

```yaml
{yaml.safe_dump(info.get('config', {}), sort_keys=False).rstrip()}
```
"""


def _update_registry(root: Path, entry: ShippedModel, retire: RetiredModel | None = None) -> None:
    models = [m for m in list_models(root) if m.name != entry.name and (retire is None or m.name != retire.name)]
    if entry.default:
        for m in models:
            if m.role == entry.role:
                m.default = False
    models.append(entry)
    retired = [r for r in list_retired(root) if r.name != entry.name]
    if retire is not None:
        retired = [r for r in retired if r.name != retire.name] + [retire]
    write_registry(root, models, retired)


def _git(folder: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"--supersede needs git to check that the old version is committed ({exc})") from None


def committed_version(old: ShippedModel, new_name: str) -> RetiredModel:
    """``old`` as a retired entry, after checking that git holds it: every file of its folder tracked and
    unmodified at HEAD (the commit recorded)."""
    folder = old.folder
    if not folder.is_dir():
        raise UserError(f"--supersede {old.name}: its folder {folder} is missing")
    head = _git(folder, "rev-parse", "HEAD")
    if head.returncode != 0:
        raise UserError(f"--supersede {old.name}: {folder} is not in a git checkout, so deleting it would lose it; "
                        "ship without --supersede")
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    tracked = set(_git(folder, "ls-files").stdout.splitlines())
    dirty = _git(folder, "status", "--porcelain", "--", ".").stdout.strip()
    if files - tracked or dirty:
        what = sorted(files - tracked)[:1] or [dirty.splitlines()[0]]
        raise UserError(f"--supersede {old.name}: {folder} is not committed as it is ({what[0]}); commit it first, "
                        "so that git history keeps it")
    return RetiredModel(name=old.name, path=old.path, commit=head.stdout.strip(), replaced_by=new_name)


def ship(src: str, name: str, eval_dir: Path | None = None, dtype: str = "float16", steps: int = 28,
         guidance: float | None = None, machine: str | None = None, wall_time: str | None = None,
         command: str | None = None, role: str = "teacher", root: Path | None = None, replace: bool = False,
         max_mb: float = 40.0, max_pixel_diff: float = 2.0, check_prompts: int = 5, default: bool = True,
         supersede: str | None = None) -> Path:
    """Write the shipped asset ``name`` from pipeline folder ``src``; returns its folder. ``supersede``
    names a committed version that this one replaces (see the module docstring)."""
    root = Path(root) if root is not None else assets_root()
    retire = None
    if supersede is not None:
        old = find_shipped(supersede, root)
        if old is None:
            raise UserError(f"--supersede {supersede}: no shipped model has that name; shipped: "
                            f"{', '.join(m.name for m in list_models(root)) or 'none'}")
        if supersede == name:
            raise UserError("--supersede must name the old version, not the one being shipped")
        retire = committed_version(old, name)
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"--name {name!r} must be a plain folder name such as shapes-v1")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} must be one of {', '.join(DTYPES)}")
    target = root / f"{role}s" / name
    if target.exists() and not replace:
        raise UserError(f"{target} already exists; ship a new version under a new name (e.g. bump -v1 to -v2), "
                        "or pass --replace while the old one is not committed yet")
    info_path = Path(src) / "pretrain.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    evals = read_evals(eval_dir)
    if guidance is None:
        guidance = choose_guidance(evals, steps)
        if guidance is None:
            raise UserError("pass --guidance, or --eval-dir with val evaluations at --steps to choose it from")
    pipe = load_pipeline(src)
    small = load_pipeline(src)
    limit = torch.finfo(DTYPES[dtype]).max
    for comp_name, comp in small.components.items():
        if isinstance(comp, torch.nn.Module):
            big = max((float(t.abs().max()) for t in comp.state_dict().values() if t.is_floating_point()), default=0.0)
            if big >= limit:
                raise UserError(f"{comp_name} holds a weight of magnitude {big:.3g}, beyond {dtype}; ship with "
                                "--dtype bfloat16 or float32")
            comp.to(DTYPES[dtype])
    extras: dict[str, str | bytes] = {}
    training = Path(src) / "training"  # the run's logs, with those of the stages it continued (init/)
    for p in sorted(training.rglob("*")) if training.is_dir() else []:
        if p.is_file():
            extras[f"training/{p.relative_to(training).as_posix()}"] = p.read_bytes()
    for fname, r in evals:
        extras[f"eval/{fname}"] = json.dumps(r, indent=1)
    if info:
        extras["pretrain.json"] = json.dumps(info, indent=1)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=root) as tmp:
        stage = save_pipeline(small, Path(tmp) / name, extra_files=extras)
        load_in_float32(stage)
        write_checksums(stage)
        check = storage_check(pipe, stage, steps, guidance, check_prompts)
        if check["mean_abs_pixel_diff"] > max_pixel_diff:
            raise UserError(f"{dtype} storage changes the images by {check['mean_abs_pixel_diff']} pixel levels on "
                            f"average (limit {max_pixel_diff}); ship with --dtype float32 or bfloat16")
        nbytes = folder_bytes(stage)
        if nbytes > max_mb * 1e6:
            raise UserError(f"the asset would take {nbytes / 1e6:.1f} MB, over the {max_mb:g} MB limit; ship a "
                            "smaller model or 16-bit weights")
        entry = ShippedModel(name=name, path=f"{role}s/{name}", role=role, steps=steps, guidance=float(guidance),
                             default=default, dtype=dtype, bytes=nbytes, root=root,
                             description=f"shapes-world {role}, {info.get('name', '?')} preset",
                             extra={"trained_steps": (info.get("snapshot") or {}).get(
                                 "step", info.get("config", {}).get("flow", {}).get("steps")),
                                 "commit": info.get("commit", "unknown"), "storage_check": check})
        wall = wall_time or _wall_from_info(info)
        machine = machine or f"{platform.machine()} {os.cpu_count()}-core ({platform.processor() or 'cpu'})"
        command = command or f"sd35flash pretrain --preset {info.get('name', '?')} --out OUT"
        (stage / "README.md").write_text(model_card(name, info, entry, evals, check, machine, wall, command))
        write_checksums(stage)
        entry.bytes = folder_bytes(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(stage, target)
    _update_registry(root, entry, retire)
    if retire is not None:
        shutil.rmtree((root / retire.path))
        print(f"retired {retire.name}: its folder left the tree; git commit {retire.commit[:12]} keeps it")
    print(f"shipped {name}: {target} ({entry.bytes / 1e6:.1f} MB, {dtype}; storage check: mean pixel diff "
          f"{check['mean_abs_pixel_diff']}, verdicts agree {check['verdicts_agree']}/{check['prompts']})")
    return target


def _wall_from_info(info: dict) -> str:
    w = info.get("train_wall_seconds")
    if isinstance(w, dict):
        return f"VAE {w.get('vae', 0) / 60:.0f} min + flow {w.get('flow', 0) / 3600:.2f} h (summed over sessions)"
    if "train_seconds_this_session" in info:
        return f"{info['train_seconds_this_session'] / 60:.0f} min (last session)"
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd35flash.ship", description=__doc__.splitlines()[0])
    p.add_argument("src", help="SD3 pipeline folder (e.g. from `sd35flash pretrain --snapshot`)")
    p.add_argument("--name", required=True, help="versioned asset name, e.g. shapes-v1")
    p.add_argument("--eval-dir", type=Path,
                   help="folder of `sd35flash eval` JSONs for the card (bench/eval_teacher.sh)")
    p.add_argument("--dtype", default="float16", choices=tuple(DTYPES))
    p.add_argument("--steps", type=int, default=28, help="recommended sampling steps")
    p.add_argument("--guidance", type=float, help="recommended guidance (default: the best on val at --steps)")
    p.add_argument("--machine", help="where it was trained, for the card")
    p.add_argument("--wall-time", help="training wall time, for the card (default: from pretrain.json)")
    p.add_argument("--command", help="the training command, for the card")
    p.add_argument("--role", default="teacher", choices=("teacher", "student"))
    p.add_argument("--assets", type=Path, help="assets folder (default: the package's, or $SD35FLASH_ASSETS)")
    p.add_argument("--replace", action="store_true", help="overwrite an existing asset of that name")
    p.add_argument("--supersede", metavar="OLD",
                   help="retire the committed version OLD: delete its folder, keep it in the registry's retired list")
    p.add_argument("--max-mb", type=float, default=40.0)
    p.add_argument("--max-pixel-diff", type=float, default=2.0)
    args = p.parse_args(argv)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        ship(args.src, args.name, args.eval_dir, args.dtype, args.steps, args.guidance, args.machine, args.wall_time,
             args.command, args.role, args.assets, args.replace, args.max_mb, args.max_pixel_diff,
             supersede=args.supersede)
    except UserError as e:
        print(f"sd35flash.ship: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
