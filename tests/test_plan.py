"""The memory planner: exact meta-device parameter counts, plan JSON, and prediction vs measurement."""

from __future__ import annotations

import json

import pytest
import torch

from sd35flash.cli import main
from sd35flash.deploy.runtime.presets import PRESETS
from sd35flash.deploy.tools.plan import PRESET_MEMORY, plan_memory
from sd35flash.deploy.tools.plan_check import check_transformer, check_vae
from sd35flash.errors import UserError
from sd35flash.models import ToyConfig, build_transformer, build_vae, save_pipeline
from sd35flash.plan.architecture import (
    build_on_meta,
    load_architecture,
    param_stats,
    transformer_activation_elements,
    vae_decode_activation_elements,
)


@pytest.fixture(scope="module")
def sd35_counts() -> dict[str, dict[str, int]]:
    out = {}
    for name in ("sd35-medium", "sd35-large"):
        out[name] = {part: (param_stats(m).params + param_stats(m).buffers if m is not None else 0)
                     for part, m in build_on_meta(load_architecture(name)).items()}
    return out


def test_meta_parameter_counts_match_published_sizes(sd35_counts):
    med, large = sd35_counts["sd35-medium"], sd35_counts["sd35-large"]
    assert 2.4e9 < med["transformer"] < 2.6e9        # "2.5B" (incl. the 384x384 position table)
    assert 8.0e9 < large["transformer"] < 8.2e9      # "8.1B"
    assert 4.6e9 < med["t5"] < 4.8e9                 # T5-XXL encoder "4.7B"
    assert 1.2e8 < med["clip_l"] < 1.3e8 and 6.9e8 < med["clip_g"] < 7.0e8
    assert 8.0e7 < med["vae"] < 9.0e7
    assert med["t5"] == large["t5"] and med["clip_g"] == large["clip_g"]  # shared encoders


def test_plan_json_keys_and_preset_ordering(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", "sd35-medium", "--preset", "laptop-8bit-no-t5", "--resolution", "1024",
                 "--json", str(out)]) == 0
    laptop = json.loads(out.read_text())
    assert {"peak_gib", "weights_gib", "activations_gib", "components"} <= set(laptop)
    assert set(laptop["components"]) == {"transformer", "clip_l", "clip_g", "t5", "vae"}
    for c in laptop["components"].values():
        assert {"params", "bytes"} <= set(c)
    assert laptop["components"]["t5"]["bytes"] == 0 and not laptop["components"]["t5"]["loaded"]
    assert "laptop-8bit-no-t5" in capsys.readouterr().out
    desktop = plan_memory("sd35-medium", "desktop-16bit-t5", 1024)
    mobile = plan_memory("sd35-medium", "mobile-6bit-no-t5", 1024)
    resident = plan_memory("sd35-medium", "laptop-8bit-no-t5", 1024, free_encoders=False)
    # paper: ~18 GiB for 16-bit with T5, ~6 GiB for 8-bit without (before CUDA context); the laptop
    # preset also frees the CLIP encoders after encoding, which takes ~1.5 GiB more off
    assert 15 < desktop["peak_gib"] < 19 and 4.5 < resident["peak_gib"] < 7
    assert 1.3 < resident["peak_gib"] - laptop["peak_gib"] < 1.7
    assert laptop["peak_gib"] <= 0.4 * desktop["peak_gib"] and laptop["peak_gib"] < 8  # issue targets
    assert mobile["weights_gib"] < laptop["weights_gib"] < desktop["weights_gib"]
    tr = desktop["components"]["transformer"]
    assert tr["bytes"] == 2 * (tr["params"] + tr["buffers"])  # bf16: exactly 2 bytes per element
    assert laptop["components"]["transformer"]["bytes"] < 0.6 * tr["bytes"]
    cfg = plan_memory("sd35-medium", "desktop-16bit-t5", 1024, cfg=True)
    assert cfg["components"]["transformer"]["activation_bytes"] == 2 * tr["activation_bytes"]
    assert plan_memory("sd35-medium", "desktop-16bit-t5", 512)["activations_gib"] < desktop["activations_gib"]


def test_plan_bad_input_is_one_line(capsys):
    assert main(["plan", "--config", "sd35-medium", "--preset", "phone", "--resolution", "512"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown preset 'phone'" in err and "laptop-8bit-no-t5" in err
    assert main(["plan", "--config", "nowhere", "--preset", "cpu-onnx-int8", "--resolution", "512"]) == 2
    assert main(["plan", "--config", "sd35-large", "--preset", "cpu-onnx-int8", "--resolution", "500"]) == 2



def test_planner_reads_the_preset_registry():
    assert set(PRESET_MEMORY) == set(PRESETS)
    for name, p in PRESETS.items():
        m = PRESET_MEMORY[name]
        assert (m.use_t5, m.free_encoders) == (p.use_t5, p.free_encoders), name
        assert m.activation_bytes == (4 if p.precision == "fp32" else 2)
    t5 = {n: plan_memory("sd35-medium", n, 512)["components"]["t5"]["bytes"]
          for n in ("reference-fp32", "desktop-16bit-t5", "desktop-8bit-t5int8", "laptop-8bit-no-t5")}
    assert t5["reference-fp32"] == 2 * t5["desktop-16bit-t5"] and t5["laptop-8bit-no-t5"] == 0
    assert 0.5 < t5["desktop-8bit-t5int8"] / t5["desktop-16bit-t5"] < 0.6  # int8 + per-row scales


def test_plan_of_a_pipeline_folder_counts_its_modules(tiny_pipeline, tmp_path):
    pipe = tiny_pipeline()
    save_pipeline(pipe, tmp_path / "toy")
    plan = plan_memory(str(tmp_path / "toy"), "cpu-onnx-int8", 32)
    comps = plan["components"]
    for name, attr in (("transformer", "transformer"), ("clip_l", "text_encoder"), ("t5", "text_encoder_3"),
                       ("vae", "vae")):
        module = getattr(pipe, attr)
        assert comps[name]["params"] == sum(p.numel() for p in module.parameters()), name
    assert plan["tokens"] == {"image": 16, "text": 24}  # (32/4/2)^2; 12 CLIP + 12 T5 tokens
    assert comps["vae"]["bytes"] == 4 * (comps["vae"]["params"] + comps["vae"]["buffers"])  # fp32 VAE


def test_toy_prediction_matches_measured_peak():
    """Formula vs torch's MemTracker on the default toy teacher (float32, real CPU run): within 10%."""
    toy = ToyConfig()
    tr_cfg = dict(build_transformer(toy).config)
    row = check_transformer("toy", tr_cfg, toy.image_size, 2 * toy.text_max_length, 2, torch.float32,
                            vae_scale=toy.vae_scale_factor)
    assert abs(row["error"]) < 0.10, row
    row = check_vae("toy", dict(build_vae(toy).config), toy.image_size, torch.float32)
    assert abs(row["error"]) < 0.10, row
    # the formulas scale as documented: batch linearly, VAE with the pixel count
    assert transformer_activation_elements(tr_cfg, 64, 48, 2) == 2 * transformer_activation_elements(tr_cfg, 64, 48, 1)
    vae_cfg = {"block_out_channels": [128, 256, 512, 512]}
    assert vae_decode_activation_elements(vae_cfg, 1024, 1) == 3 * 256 * 1024 * 1024


def test_unknown_architecture_key(tmp_path):
    bad = tmp_path / "arch.yaml"
    bad.write_text("name: x\ntransformr: {}\n")
    with pytest.raises(UserError, match=r"unknown config key 'arch\.transformr' \(did you mean 'transformer'\?\)"):
        load_architecture(str(bad))


def test_mistyped_architecture_value(tmp_path):
    """An architecture YAML is a typed config: a value of the wrong type is one line naming its key."""
    (tmp_path / "b.yaml").write_text("text_tokens: {clip: 1.5}\n")
    with pytest.raises(UserError, match=r"b\.text_tokens\.clip: expected an integer"):
        load_architecture(str(tmp_path / "b.yaml"))
