"""The training-memory planner (`plan --train`), its formulas vs MemTracker, and distill's refusal."""

from __future__ import annotations

import json

import pytest

from sd35flash.cli import main
from sd35flash.deploy.tools.plan_train_check import check_train_pass
from sd35flash.distill.memory_check import MEMORY_ENV, cheapest_fit, check_training_fits
from sd35flash.errors import UserError
from sd35flash.models import save_pipeline
from sd35flash.plan.train import TrainSetup, plan_training

SMALL = dict(sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
             num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=32,
             pos_embed_max_size=16, dual_attention_layers=[0], qk_norm="rms_norm")


def test_plan_train_cli_json_and_what_each_option_changes(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--train", "--config", "sd35-medium", "--mode", "lora", "--json", str(out)]) == 0
    lora = json.loads(out.read_text())
    assert "sd35-medium distillation (lora" in capsys.readouterr().out
    assert {"peak_gib", "peak_phase", "phases", "parts", "phase_parts"} <= set(lora)
    assert {"trajectory", "critic_update", "generator_update", "probe"} == set(lora["phases"])
    assert lora["peak_gib"] == max(lora["phases"].values())
    for phase, parts in lora["phase_parts"].items():
        assert sum(parts.values()) == pytest.approx(lora["phases"][phase])
    full = plan_training(TrainSetup("sd35-medium", "full"))
    # one frozen bf16 base (2.5B params incl. the position table) vs teacher + fp32 student + fake
    assert 4.4 < lora["parts"]["weights"]["teacher"] < 4.8 and lora["parts"]["weights"]["student"] == 0
    assert full["parts"]["weights"]["student"] == pytest.approx(2 * full["parts"]["weights"]["teacher"])
    assert lora["peak_gib"] < 40 < full["peak_gib"]  # issue target: Medium LoRA on one GPU <= 40 GiB
    ck = plan_training(TrainSetup("sd35-medium", "full", gradient_checkpointing=True))
    assert ck["parts"]["activations"]["generator_update"] < 0.2 * full["parts"]["activations"]["generator_update"]
    eight = plan_training(TrainSetup("sd35-medium", "full", gpus=8))
    assert eight["setup"]["sharding"] == "fsdp"
    assert eight["parts"]["optimizer"]["student"] == pytest.approx(full["parts"]["optimizer"]["student"] / 8)
    assert eight["peak_gib"] <= 70  # issue target: Medium full FSDP2 on 8 GPUs <= 70 GiB
    ddp = plan_training(TrainSetup("sd35-medium", "full", gpus=8, sharding="ddp"))
    assert ddp["parts"]["ddp_buckets"] > 0 and ddp["peak_gib"] > full["peak_gib"]  # replicas + buckets
    q = plan_training(TrainSetup("sd35-medium", "full", optimizer="adamw8bit", ema="cpu"))
    assert q["parts"]["optimizer"]["fake"] == pytest.approx(full["parts"]["optimizer"]["fake"] * 2.03125 / 8, rel=1e-3)
    assert q["parts"]["ema"] == 0 and q["host_gib"]["ema"] == pytest.approx(full["parts"]["ema"])
    enc = plan_training(TrainSetup("sd35-medium", "lora", encoders="resident"))
    assert 10 < enc["parts"]["weights"]["text_encoders"] < 11  # T5-XXL + CLIPs in bf16
    split = plan_training(TrainSetup("sd35-medium", "lora", split_branches=2))
    assert split["phases"]["split_generator_update"] > split["phases"]["generator_update"]


def test_plan_needs_a_preset_or_train(capsys):
    assert main(["plan", "--config", "sd35-medium"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--train" in err
    assert main(["plan", "--train", "--config", "sd35-medium", "--resolution", "1000"]) == 2


@pytest.mark.parametrize("kind,ckpt", [("full", False), ("full", True), ("lora", False), ("lora", True)])
def test_training_pass_formula_matches_memtracker(kind, ckpt):
    """One forward + backward of a small SD3 transformer (float32, real CPU run): within 10%."""
    row = check_train_pass("small", SMALL, 256, 24, 1, kind, ckpt, rank=4)
    assert abs(row["error"]) < 0.10, row


def test_refusal_names_the_cheapest_option_that_fits():
    with pytest.raises(UserError) as exc:
        check_training_fits(TrainSetup("sd35-medium", "full"), 40.0)
    msg = str(exc.value)
    assert "\n" not in msg and "--force" in msg and "--mode lora would fit" in msg
    assert cheapest_fit(TrainSetup("sd35-medium", "full"), 80.0)[0] == "--optimizer adamw8bit"
    label, peak = cheapest_fit(TrainSetup("sd35-large", "full", gpus=8), 40.0)
    assert label == "--gradient-checkpointing" and peak < 39
    assert cheapest_fit(TrainSetup("sd35-large", "full", gradient_checkpointing=True, optimizer="adamw8bit",
                                   ema="cpu"), 70.0)[0].startswith("--mode lora")
    assert check_training_fits(TrainSetup("sd35-medium", "lora"), 40.0)["peak_gib"] < 39


def test_distill_refuses_before_loading_and_force_skips_the_check(tiny_pipeline, tmp_path, monkeypatch, capsys):
    teacher = tmp_path / "teacher"
    save_pipeline(tiny_pipeline(words="a red circle".split()), teacher)
    capsys.readouterr()
    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(MEMORY_ENV, "0.001")
    args = ["distill", "--teacher", str(teacher), "--out", str(tmp_path / "student"), "--preset", "smoke",
            "--prompts", str(tmp_path / "missing.txt"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GiB" in err and "--force" in err, err
    assert not (tmp_path / "cache").exists()  # refused before anything was loaded or written
    assert main([*args, "--force"]) == 2  # past the check: now the missing prompt file stops it
    err = capsys.readouterr().err.strip()
    assert "missing.txt" in err and "--force" not in err


def test_distill_reads_its_memory_options_and_suggests_its_own_overrides():
    from sd35flash.distill.config import load_distill_config
    from sd35flash.distill.memory_check import setup_for_distill
    from sd35flash.plan.architecture import load_architecture

    cfg = load_distill_config("smoke")
    cfg.memory.ema_device, cfg.memory.conditioning, cfg.memory.optimizer = "cpu", "precompute", "adamw8bit"
    setup = setup_for_distill(cfg, load_architecture("sd35-medium"), 1, "cpu")
    assert (setup.ema, setup.encoders, setup.optimizer) == ("cpu", "freed", "adamw8bit")
    with pytest.raises(UserError) as exc:
        check_training_fits(TrainSetup("sd35-medium", "full"), 80.0, for_distill=True)
    msg = str(exc.value)
    assert "--set memory.optimizer=adamw8bit would fit" in msg and "--mode lora would fit" not in msg
