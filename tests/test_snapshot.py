"""`pretrain --snapshot`: the EMA pipeline of an unfinished run, read-only on its work folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from sd35flash.cli import main
from sd35flash.config import merge, to_dict
from sd35flash.errors import StopTraining
from sd35flash.models.pipeline_io import load_pipeline
from sd35flash.pretrain.run import pretrain
from sd35flash.pretrain.snapshot import init_logs, snapshot
from sd35flash.toy_teacher import load_pretrain_config, teacher_dir


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


@pytest.fixture(scope="module")
def stopped_run(cache_dir, tmp_path_factory):
    """A smoke-size run (its own config file, so its own cache folder) stopped at flow step 20 of 30."""
    cfg = merge(load_pretrain_config("smoke"), {"data_seed": 3})
    path = tmp_path_factory.mktemp("cfg") / "smoke-snap.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    cfg = load_pretrain_config(None, str(path))
    with pytest.raises(StopTraining):
        pretrain(cfg, None, "smoke-snap", progress=False, stop_at=20)
    return cfg, path, teacher_dir(cfg, "smoke-snap") / "work"


def test_snapshot_holds_the_newest_ema_weights_and_leaves_the_run_alone(stopped_run, tmp_path, capsys):
    cfg, path, work = stopped_run
    flow = work / "flow"
    # a checkpoint being written (.tmp) and one whose EMA file vanished mid-copy: both are skipped
    (flow / "ckpt-00000030.tmp").mkdir()
    (flow / "ckpt-00000030.tmp" / "meta.json").write_text('{"step": 30}')
    (flow / "ckpt-00000025").mkdir()
    (flow / "ckpt-00000025" / "meta.json").write_text('{"step": 25}')
    before = _tree(work)
    out = tmp_path / "snap"
    assert main(["pretrain", "--config", str(path), "--snapshot", str(out)]) == 0
    assert "flow step 20/30" in capsys.readouterr().out
    assert _tree(work) == before  # read-only on the work folder
    info = json.loads((out / "pretrain.json").read_text())
    assert info["snapshot"] == {"step": 20, "of_steps": 30, "ema": True, "checkpoint": "ckpt-00000020"}
    assert info["fingerprint"] == cfg.cache_key()
    assert (out / "training" / "vae-metrics.jsonl").is_file()
    # the transformer holds the EMA shadow weights of ckpt 20, not the raw weights
    ema = torch.load(flow / "ckpt-00000020" / "custom_checkpoint_0.pkl", weights_only=True)["shadow_params"]
    pipe = load_pipeline(out)
    tf = list(pipe.transformer.parameters())
    assert all(torch.equal(a, b) for a, b in zip(tf, ema[: len(tf)]))
    from safetensors.torch import load_file

    raw = load_file(str(flow / "ckpt-00000020" / "model.safetensors"))
    raw_tf = [v for k, v in raw.items() if k.startswith("transformer.")]
    assert raw_tf and not all(torch.equal(a, b) for a, b in zip(sorted(raw_tf, key=lambda t: t.numel()),
                                                              sorted(tf, key=lambda t: t.numel())))
    # and it samples
    from sd35flash.sampling import generate, scheduler_schedule

    img = generate(pipe, ["a red circle"], [0], scheduler_schedule(pipe, 2), guidance=4.0)
    assert img.shape == (1, 64, 64, 3)


def test_snapshot_errors(cache_dir, tmp_path, capsys):
    path = tmp_path / "never-run.yaml"
    path.write_text(yaml.safe_dump(to_dict(merge(load_pretrain_config("smoke"), {"data_seed": 11}))))
    assert main(["pretrain", "--config", str(path), "--snapshot", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has reached the flow stage" in err
    assert not (tmp_path / "s").exists()
    assert not teacher_dir(load_pretrain_config(None, str(path)), "never-run").exists()
    with pytest.raises(SystemExit) as exc:  # neither --out nor --snapshot
        main(["pretrain", "--preset", "smoke"])
    assert exc.value.code == 2 and "--out --snapshot is required" in capsys.readouterr().err


def test_snapshot_of_a_finished_run_copies_it_with_its_logs(smoke_teacher, tmp_path):
    out = tmp_path / "snap"
    assert main(["pretrain", "--preset", "smoke", "--snapshot", str(out)]) == 0
    assert json.loads((out / "pretrain.json").read_text()) == json.loads((smoke_teacher / "pretrain.json").read_text())
    assert "probe/overall" in (out / "training" / "flow-metrics.jsonl").read_text()


def test_a_continued_stage_carries_the_logs_of_the_stages_before_it(smoke_teacher, tmp_path):
    """A run with ``init: preset:smoke``: its snapshot holds its own logs and, under training/init/, the
    smoke run's; shipping keeps that tree, and the training curve joins the stages on one step axis."""
    from sd35flash.evaluate.training_curve import main as curve_main
    from sd35flash.ship import ship

    cfg = merge(load_pretrain_config("smoke"), {"init": "preset:smoke", "flow": {"steps": 4, "probe_every": 2,
                                                                                "sample_every": 0}})
    pretrain(cfg, None, "smoke-cont", progress=False)
    out = snapshot(cfg, "smoke-cont", tmp_path / "snap")
    smoke_work = teacher_dir(load_pretrain_config("smoke"), "smoke") / "work"
    assert (out / "training" / "init" / "flow-metrics.jsonl").read_bytes() == \
        (smoke_work / "flow" / "metrics.jsonl").read_bytes()
    assert (out / "training" / "init" / "vae-metrics.jsonl").is_file()
    assert "probe/overall" in (out / "training" / "flow-metrics.jsonl").read_text()
    assert not (out / "training" / "vae-metrics.jsonl").exists()  # the VAE came with the init
    curve = tmp_path / "curve.json"
    assert curve_main([str(out), str(tmp_path / "curve.png"), "--json", str(curve)]) == 0
    data = json.loads(curve.read_text())
    smoke_steps = load_pretrain_config("smoke").flow.steps
    assert data["stage_starts"] == [smoke_steps]
    assert [s for s, _ in data["curves"]["probe/overall"]][-2:] == [smoke_steps + 2, smoke_steps + 4]
    shipped = ship(str(out), "cont-v1", root=tmp_path / "assets", guidance=4.0, check_prompts=1)
    assert (shipped / "training" / "init" / "flow-metrics.jsonl").is_file()
    # a stage that continues the shipped one finds the whole chain in its training/ folder
    cfg2 = merge(load_pretrain_config("smoke"), {"init": str(shipped), "flow": {"steps": 2, "probe_every": 0,
                                                                                "sample_every": 0}})
    logs = init_logs(cfg2)
    assert {"init/flow-metrics.jsonl", "init/init/flow-metrics.jsonl"} <= logs.keys()


def test_stop_at_from_the_cli(cache_dir, tmp_path, capsys):
    """`pretrain --stop-at STEP` stops after that step with its checkpoint (exit 75), so `--snapshot`
    then gives that step's EMA teacher; a step outside (run's step, last step) and a stop with
    --snapshot are one-line errors (the first before any training)."""
    cfg = merge(load_pretrain_config("smoke"), {"data_seed": 5})
    path = tmp_path / "smoke-stop.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    work = teacher_dir(load_pretrain_config(None, str(path)), "smoke-stop") / "work"
    assert main(["pretrain", "--config", str(path), "--out", str(tmp_path / "t"), "--stop-at", "30"]) == 2
    assert "flow stage ends at step 30" in capsys.readouterr().err and not work.exists()
    assert main(["pretrain", "--config", str(path), "--snapshot", str(tmp_path / "s"), "--stop-at", "5"]) == 2
    assert "--snapshot" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(path), "--out", str(tmp_path / "t"), "--stop-at", "10",
                 "--no-progress"]) == 75
    assert "stopped at step 10" in capsys.readouterr().err
    assert sorted(p.name for p in (work / "flow").glob("ckpt-*")) == ["ckpt-00000010"]
    assert main(["pretrain", "--config", str(path), "--out", str(tmp_path / "t"), "--resume", "--stop-at", "10",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must lie after the run's step 10" in err[0]
    assert main(["pretrain", "--config", str(path), "--snapshot", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "pretrain.json").read_text())["snapshot"]["step"] == 10
