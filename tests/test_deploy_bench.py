"""``sd35flash bench`` on the tiny model: one subprocess per row, every key of the JSON."""

from __future__ import annotations

import json

from sd35flash.cli import main
from sd35flash.deploy.runtime.quantize import WEIGHTS_FILE
from sd35flash.deploy.tools.bench import ROW_KEYS


def test_bench_writes_every_key(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path / "cache"))
    model = tiny_dir
    js = tmp_path / "bench.json"
    assert main(["bench", "--model", str(model), "--teacher", str(model), "--teacher-steps", "2", "--steps", "2",
                 "--guidance", "1", "--presets", "laptop-8bit-no-t5", "--num-images", "2", "--runs", "1",
                 "--eval-images", "4", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert set(res["presets"]) == {"laptop-8bit-no-t5"} and res["teacher"]["model"] == str(model)
    laptop, teacher = res["presets"]["laptop-8bit-no-t5"], res["teacher"]
    for row in (laptop, teacher):
        for key in ROW_KEYS:
            assert row[key] is not None, key
        assert row["seconds_per_image"] > 0 and row["transformer_seconds_per_step"] > 0
        assert 0 < row["baseline_rss_gib"] < row["peak_memory_gib"]
        assert 0.0 <= row["alignment"] <= 1.0 and row["fd_effnet"] > 0
    assert laptop["use_t5"] is False and teacher["use_t5"] is True
    assert teacher["steps"] == 2 and teacher["preset"]["name"] == "reference-fp32"
    # the laptop row's weights: its saved int8 transformer plus bf16 VAE and CLIPs, smaller than the fp32 teacher's
    ckpt = tmp_path / "bench.work" / "laptop-8bit-no-t5" / "transformer" / WEIGHTS_FILE
    assert ckpt.is_file() and laptop["weights_gib"] * 2**30 > ckpt.stat().st_size
    assert laptop["weights_gib"] < 0.5 * teacher["weights_gib"]
