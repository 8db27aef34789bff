"""Shipped models: the ship tool on the smoke teacher, the registry, name resolution, and the errors
for unknown names and damaged or missing assets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sd35flash.cli import main
from sd35flash.errors import UserError
from sd35flash.evaluate.evaluator import EvalRequest, evaluate
from sd35flash.models.pipeline_io import load_pipeline
from sd35flash.models.registry import CHECKSUM_FILE, REGISTRY_FILE, list_models, list_retired, resolve_model
from sd35flash.models.sampling_settings import resolve_sampling
from sd35flash.sampling import generate, scheduler_schedule
from sd35flash.ship import ship


@pytest.fixture(scope="module")
def assets(smoke_teacher, tmp_path_factory):
    """An assets folder holding the smoke teacher shipped as ``smoke-v1`` (fp16), with real val
    evaluations at two guidance scales; ``SD35FLASH_ASSETS`` points at it for this module."""
    evals = tmp_path_factory.mktemp("evals")
    for g in (1.0, 4.0):
        evaluate(EvalRequest(model=str(smoke_teacher), steps=28, guidance=g, split="val", num_images=4, fd=False),
                 evals / f"val-28-g{g:g}.json", progress=False)
    root = tmp_path_factory.mktemp("assets")
    ship(str(smoke_teacher), "smoke-v1", eval_dir=evals, root=root, machine="test machine", check_prompts=2,
         guidance=4.0)
    old = os.environ.get("SD35FLASH_ASSETS")
    os.environ["SD35FLASH_ASSETS"] = str(root)
    yield root
    if old is None:
        os.environ.pop("SD35FLASH_ASSETS", None)
    else:
        os.environ["SD35FLASH_ASSETS"] = old


def _damaged_copy(assets: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private copy of the assets folder (so damage stays local), made the active one."""
    root = tmp_path / "assets"
    shutil.copytree(assets, root)
    monkeypatch.setenv("SD35FLASH_ASSETS", str(root))
    return root / "teachers" / "smoke-v1"


def test_ship_writes_a_16bit_asset_with_card_and_checksums(assets, smoke_teacher):
    folder = assets / "teachers" / "smoke-v1"
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    src = sum(p.stat().st_size for p in Path(smoke_teacher).rglob("*.safetensors"))
    weights = list(folder.rglob("*.safetensors"))
    assert len(weights) == 5 and total <= 40e6
    assert sum(p.stat().st_size for p in weights) < 0.6 * src  # 16-bit storage
    for w in weights:
        with safe_open(str(w), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, w
    # coreutils agrees with the checksum file
    proc = subprocess.run(["sha256sum", "--quiet", "-c", CHECKSUM_FILE], cwd=folder, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = {line.split("  ", 1)[1] for line in (folder / CHECKSUM_FILE).read_text().splitlines()}
    assert "README.md" in listed and "transformer/diffusion_pytorch_model.safetensors" in listed
    card = (folder / "README.md").read_text()
    info = json.loads((folder / "pretrain.json").read_text())
    assert "guidance 4.0" in card and info["commit"] in card and "test machine" in card
    assert "val-28-g4.json" in card and "val-28-g1.json" in card and "num_layers:" in card
    (entry,) = list_models(assets)
    assert (entry.name, entry.role, entry.steps, entry.guidance, entry.default) == ("smoke-v1", "teacher", 28, 4.0,
                                                                                     True)
    assert entry.bytes == total


def test_default_guidance_is_the_best_on_val(assets):
    from sd35flash.evaluate.teacher_table import read_evals
    from sd35flash.ship import choose_guidance

    evals = read_evals(assets / "teachers" / "smoke-v1" / "eval")  # the real val evaluations, copied in
    val = {r["guidance"]: r["alignment"]["overall"] for _, r in evals}
    assert sorted(val) == [1.0, 4.0]
    assert val[choose_guidance(evals, 28)] == max(val.values())
    assert choose_guidance(evals, 4) is None  # no val evaluation at 4 steps


def test_asset_loads_in_sd35flash_and_stock_diffusers(assets, smoke_teacher, tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    folder = assets / "teachers" / "smoke-v1"
    stock = StableDiffusion3Pipeline.from_pretrained(folder)  # no dtype: every part must agree
    assert {m.dtype for m in stock.components.values() if isinstance(m, torch.nn.Module)} == {torch.float32}
    img = stock("a red circle", num_inference_steps=2, guidance_scale=4.0, output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    # through sd35flash, by name; the image is what the fp32 source gives, to within fp16 rounding
    out = tmp_path / "x.png"
    assert main(["generate", "--model", "smoke-v1", "--steps", "6", "a red circle", "--out", str(out)]) == 0
    assert out.is_file() and "guidance 4.0" in capsys.readouterr().out
    src, shipped = load_pipeline(smoke_teacher), load_pipeline(resolve_model("smoke-v1"))
    sched = scheduler_schedule(src, 6)
    a = generate(src, ["a blue square", "two red circles"], [0, 1], sched, guidance=4.0).astype(float)
    b = generate(shipped, ["a blue square", "two red circles"], [0, 1], sched, guidance=4.0).astype(float)
    assert np.abs(a - b).mean() < 1.0


def test_models_json_lists_the_shipped_teacher(assets, capsys):
    assert main(["models", "--json", "--verify"]) == 0
    (m,) = json.loads(capsys.readouterr().out)
    assert m["name"] == "smoke-v1" and m["role"] == "teacher" and m["steps"] == 28 and m["guidance"] == 4.0
    assert Path(m["path"]) == assets / "teachers" / "smoke-v1"
    assert main(["models"]) == 0 and "smoke-v1" in capsys.readouterr().out


def test_shipped_teacher_is_the_default_and_sets_sampling(assets):
    from sd35flash.distill.run import default_teacher

    folder = assets / "teachers" / "smoke-v1"
    assert default_teacher() == folder
    pipe = load_pipeline(folder)
    sched, steps, g = resolve_sampling(pipe, str(folder), None, None)
    assert (steps, g) == (28, 4.0) and len(sched) == 29


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_unknown_model_name_lists_the_valid_names(assets, tmp_path, capsys):
    rc = main(["generate", "--model", "shapes-v9", "a red circle", "--out", str(tmp_path / "x.png")])
    err = _one_line(capsys)
    assert rc == 2 and "shapes-v9" in err and "smoke-v1" in err
    rc = main(["distill", "--teacher", "shapes-v9", "--out", str(tmp_path / "s"), "--preset", "smoke"])
    assert rc == 2 and "smoke-v1" in _one_line(capsys)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "folder"])
def test_damaged_asset_is_a_one_line_error_naming_the_file(assets, tmp_path, monkeypatch, capsys, damage):
    folder = _damaged_copy(assets, tmp_path, monkeypatch)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "delete":
        weights.unlink()
    else:
        shutil.rmtree(folder)
    rc = main(["eval", "--model", "smoke-v1", "--split", "test", "--num-images", "2",
               "--json", str(tmp_path / "e.json")])
    err = _one_line(capsys)
    assert rc == 2 and not (tmp_path / "e.json").exists()
    named = str(folder) if damage == "folder" else str(weights)
    assert named in err, err
    assert {"flip": "checksum", "truncate": "truncated", "delete": "missing", "folder": "missing"}[damage] in err
    with pytest.raises(UserError):  # `distill` and `demo` default to it, and fail the same way
        from sd35flash.distill.run import default_teacher

        default_teacher()


def test_demo_without_a_shipped_teacher_trains_its_fallback_and_says_so(tmp_path, monkeypatch, capsys, smoke_teacher):
    """An install that ships no teacher at all: `quick`/`full` train their fallback pretrain preset with a
    notice (here the smoke preset, cached by the fixture); a preset without a fallback is a one-line error."""
    from sd35flash.demo import PRESETS, DemoPreset, _teacher

    empty = tmp_path / "assets"
    empty.mkdir()
    (empty / REGISTRY_FILE).write_text('{"models": []}')
    monkeypatch.setenv("SD35FLASH_ASSETS", str(empty))
    assert PRESETS["quick"].unshipped == "quick" and PRESETS["full"].unshipped == "default"
    folder, logs = _teacher(DemoPreset("shipped", "smoke", 8, unshipped="smoke"), False, None)
    assert (folder / "model_index.json").is_file() and logs["teacher"].name == "metrics.jsonl"
    assert "ships no teacher yet" in capsys.readouterr().out
    with pytest.raises(UserError, match="no teacher is shipped"):
        _teacher(DemoPreset("shipped", "smoke", 8), False, None)
    assert main(["models", "--json"]) == 0 and json.loads(capsys.readouterr().out) == []


def test_ship_refuses_to_overwrite_or_oversize(assets, smoke_teacher, tmp_path):
    with pytest.raises(UserError, match="already exists"):
        ship(str(smoke_teacher), "smoke-v1", root=assets, guidance=4.0)
    with pytest.raises(UserError, match="over the 0.1 MB limit"):
        ship(str(smoke_teacher), "smoke-v2", root=tmp_path / "a", guidance=4.0, max_mb=0.1, check_prompts=1)
    assert not (tmp_path / "a" / "teachers" / "smoke-v2").exists()
    assert [m.name for m in list_models(assets)] == ["smoke-v1"]


def test_supersede_retires_only_a_committed_version(assets, smoke_teacher, tmp_path, monkeypatch, capsys):
    """`ship --supersede OLD` refuses an OLD that git does not hold as it is; on a committed one it ships the
    new version, deletes OLD's folder and keeps OLD as a retired registry entry with the commit that has it.
    Asking for the retired name then names its successor and how to restore it."""
    root = tmp_path / "assets"
    shutil.copytree(assets, root)
    monkeypatch.setenv("SD35FLASH_ASSETS", str(root))
    old = root / "teachers" / "smoke-v1"
    with pytest.raises(UserError, match="not in a git checkout"):
        ship(str(smoke_teacher), "smoke-v2", root=root, guidance=4.0, check_prompts=1, supersede="smoke-v1")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root)]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "add", "models.json"], check=True)
    subprocess.run([*git, "commit", "-qm", "registry only"], check=True)
    with pytest.raises(UserError, match="not committed as it is"):
        ship(str(smoke_teacher), "smoke-v2", root=root, guidance=4.0, check_prompts=1, supersede="smoke-v1")
    with pytest.raises(UserError, match="no shipped model has that name"):
        ship(str(smoke_teacher), "smoke-v2", root=root, guidance=4.0, check_prompts=1, supersede="smoke-v7")
    assert old.is_dir() and not (root / "teachers" / "smoke-v2").exists()
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "smoke-v1"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    ship(str(smoke_teacher), "smoke-v2", root=root, guidance=4.0, check_prompts=1, supersede="smoke-v1")
    assert not old.exists() and (root / "teachers" / "smoke-v2" / "README.md").is_file()
    assert [m.name for m in list_models(root)] == ["smoke-v2"] and list_models(root)[0].default
    (gone,) = list_retired(root)
    assert (gone.name, gone.commit, gone.replaced_by, gone.path) == ("smoke-v1", head, "smoke-v2", "teachers/smoke-v1")
    capsys.readouterr()
    rc = main(["eval", "--model", "smoke-v1", "--split", "test", "--num-images", "2",
               "--json", str(tmp_path / "e.json")])
    err = _one_line(capsys)
    assert rc == 2 and "retired for 'smoke-v2'" in err and f"git archive {head}" in err
    # the hint works: the archived folder loads and verifies against its own checksums
    out = tmp_path / "restored"
    out.mkdir()
    archive = subprocess.run([*git, "archive", head, "teachers/smoke-v1"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    proc = subprocess.run(["sha256sum", "--quiet", "-c", CHECKSUM_FILE], cwd=out / "teachers" / "smoke-v1")
    assert proc.returncode == 0
    assert resolve_model(str(out / "teachers" / "smoke-v1")) == str(out / "teachers" / "smoke-v1")


def test_package_data_covers_every_asset_file():
    """Every file under src/sd35flash/assets (the registry, and each shipped folder, at any depth)
    matches a package-data pattern of pyproject.toml, so a wheel or `pip install .` carries it."""
    import glob

    import tomllib

    root = Path(__file__).resolve().parents[1]
    pkg = root / "src" / "sd35flash"
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sd35flash"]
    covered = {Path(p) for pat in patterns for p in glob.glob(str(pkg / pat), recursive=True) if Path(p).is_file()}
    files = {p for p in (pkg / "assets").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert (pkg / "assets" / REGISTRY_FILE) in files
    assert files <= covered, sorted(str(f) for f in files - covered)
    assert "assets/**/*" in patterns  # shipped folders' files, at any depth


def test_distillation_follows_the_teachers_recommended_guidance(assets, smoke_teacher, tmp_path, monkeypatch):
    """``guidance: null`` (the recipe and default presets) is the shipped teacher's registry guidance,
    4.0 for an unregistered folder; a set guidance is kept."""
    from sd35flash.config import merge
    from sd35flash.distill.config import load_distill_config
    from sd35flash.distill.run import resolve_guidance

    folder = _damaged_copy(assets, tmp_path, monkeypatch)
    index = folder.parent.parent / "models.json"
    data = json.loads(index.read_text())
    for entry in data["models"]:
        entry["guidance"] = 2.5
    index.write_text(json.dumps(data))
    cfg = load_distill_config("recipe")
    assert cfg.guidance is None and load_distill_config("default").guidance is None
    assert resolve_guidance(cfg, str(folder)).guidance == 2.5
    assert resolve_guidance(cfg, str(smoke_teacher)).guidance == 4.0
    assert resolve_guidance(merge(cfg, {"guidance": 3.0}), str(folder)).guidance == 3.0
