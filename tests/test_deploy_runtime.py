"""Device presets and text-encoder restructuring: no-T5 zeros, the embedding cache (hits skip the
encoders), freeing encoders, preset loading, and one-line CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd35flash.cli import main
from sd35flash.deploy.runtime.pipeline import load_deployed, preset_size
from sd35flash.deploy.runtime.presets import PRESETS, Preset, check_runnable, get_preset, runnable_presets
from sd35flash.deploy.runtime.text_encoders import PromptEncoder
from sd35flash.errors import UserError
from sd35flash.sampling import clip_length, encode_prompts, generate

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture()
def pipe(tiny_pipeline):
    return tiny_pipeline()


def _count_encoder_calls(monkeypatch, pipe) -> list[int]:
    calls: list[int] = []
    real = pipe.encode_prompt

    def counted(*args, **kwargs):
        calls.append(len(kwargs.get("prompt") or args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", counted)
    return calls


def test_no_t5_gives_zeros_in_t5_slots(pipe):
    n_clip = clip_length(pipe)
    with_t5 = PromptEncoder(pipe, use_t5=True)(PROMPTS)
    no_t5 = PromptEncoder(pipe, use_t5=False)(PROMPTS)
    assert no_t5.embeds.shape == with_t5.embeds.shape
    assert torch.count_nonzero(no_t5.embeds[:, n_clip:]) == 0
    assert torch.count_nonzero(with_t5.embeds[:, n_clip:]) > 0
    torch.testing.assert_close(no_t5.embeds[:, :n_clip], with_t5.embeds[:, :n_clip])
    torch.testing.assert_close(no_t5.pooled, with_t5.pooled)


def test_embedding_cache_hit_is_identical_and_skips_encoders(pipe, tmp_path, monkeypatch):
    calls = _count_encoder_calls(monkeypatch, pipe)
    first = PromptEncoder(pipe, cache_dir=tmp_path)
    a = first(PROMPTS)
    assert calls == [2] and first.encoded == 2
    second = PromptEncoder(pipe, cache_dir=tmp_path)  # a new process would look like this
    b = second(PROMPTS[::-1])
    assert calls == [2] and second.hits == 2 and second.encoded == 0
    assert torch.equal(b.embeds, a.embeds.flip(0)) and torch.equal(b.pooled, a.pooled.flip(0))
    assert torch.equal(a.embeds, encode_prompts(pipe, PROMPTS).embeds)  # what the pipeline encodes (one more call)
    assert calls == [2, 2]
    files = list((tmp_path / first.fingerprint).iterdir())
    assert len(files) == 2 and all(f.suffix == ".safetensors" for f in files)  # no temporary files left
    # the fingerprint separates T5 settings and weights
    no_t5 = PromptEncoder(pipe, use_t5=False, cache_dir=tmp_path)
    assert no_t5.fingerprint != first.fingerprint
    no_t5(PROMPTS)
    assert calls == [2, 2, 2]
    with torch.no_grad():
        pipe.text_encoder.text_projection.weight.mul_(1.01)
    assert PromptEncoder(pipe, cache_dir=tmp_path).fingerprint != first.fingerprint


def test_free_after_encoding(pipe):
    enc = PromptEncoder(pipe, free_after_encoding=True)
    enc.preload(PROMPTS + [""])
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None and pipe.text_encoder_3 is None
    assert enc(PROMPTS).embeds.shape[0] == 2  # encoded prompts stay available
    with pytest.raises(RuntimeError, match="freed"):
        enc(["three green triangles"])


def test_unwritable_cache_is_a_user_error(pipe, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="not writable"):
        PromptEncoder(pipe, cache_dir=blocker / "cache")


def test_calibration_prompts_are_the_first_val_scenes():
    """The runtime writes its calibration prompts out (it does not import the shapes world); they must
    stay the canonical prompts of ``split_specs("val", 4, seed=0)``, or cached scans would mislead."""
    from sd35flash.deploy.runtime.pipeline import CALIBRATION_PROMPTS
    from sd35flash.world import canonical_prompt, split_specs

    assert list(CALIBRATION_PROMPTS) == [canonical_prompt(s) for s in split_specs("val", 4, seed=0)]


def test_presets_registry_and_hardware_checks():
    for name in ("desktop-16bit-t5", "laptop-8bit-no-t5", "mobile-6bit-no-t5", "cpu-onnx-int8"):
        assert get_preset(name).name == name
    with pytest.raises(UserError, match="valid presets: .*laptop-8bit-no-t5"):
        get_preset("laptop")
    with pytest.raises(UserError, match="presets that can run here: .*laptop-8bit-no-t5"):
        check_runnable(PRESETS["gpu-fp8-no-t5"], "cpu")
    assert "gpu-fp8-no-t5" not in runnable_presets("cpu") and "laptop-8bit-no-t5" in runnable_presets("cpu")
    assert get_preset("laptop-8bit-no-t5").use_t5 is False and get_preset("desktop-16bit-t5").dtype == torch.bfloat16


def test_laptop_preset_loads_quantized_without_t5(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path))
    dp = load_deployed(str(tiny_dir), get_preset("laptop-8bit-no-t5"), device="cpu", progress=False)
    assert dp.pipe.text_encoder_3 is None and dp.pipe.tokenizer_3 is not None  # T5 never loaded
    assert dp.pipe.transformer.dtype == torch.bfloat16 and dp.quantized_layers and not dp.kept_layers
    w = dp.pipe.transformer.get_submodule(dp.quantized_layers[0]).weight
    assert type(w).__name__ == "Int8Tensor"
    images = generate(dp.pipe, PROMPTS, [0, 1], [1.0, 0.5, 0.0], **dp.generate_kwargs(PROMPTS, 1.0))
    assert images.shape == (2, 32, 32, 3)
    assert dp.pipe.text_encoder is None  # freed after encoding
    assert preset_size(dp.pipe, Preset("x", "", max_resolution=16)) == 16


def _one_line_error(res: tuple[int, str, str], *needles: str) -> None:
    code, _, err = res
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "torchvision" not in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_preset_errors_are_one_line(tiny_dir, tmp_path, monkeypatch, cli_in_process):
    out = str(tmp_path / "x.png")
    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path))
    _one_line_error(cli_in_process("generate", "--model", str(tiny_dir), "--preset", "phone", "a red circle", "--out",
                                   out), "unknown preset 'phone'", "mobile-6bit-no-t5")
    _one_line_error(cli_in_process("generate", "--model", str(tiny_dir), "--preset", "gpu-fp8-no-t5", "--device",
                                   "cpu", "a red circle", "--out", out),
                    "cannot run on cpu", "presets that can run here")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("SD35FLASH_CACHE", str(blocker / "cache"))
    _one_line_error(cli_in_process("eval", "--model", str(tiny_dir), "--preset", "laptop-8bit-no-t5", "--split",
                                   "test", "--json", str(tmp_path / "e.json")), "not writable")
    assert not Path(out).exists() and not (tmp_path / "e.json").exists()


def test_cli_presets_generate_and_eval(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path / "cache"))
    assert main(["presets", "--json", str(tmp_path / "p.json")]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in PRESETS)
    assert set(json.loads((tmp_path / "p.json").read_text())) == set(PRESETS)
    out = tmp_path / "one.png"
    assert main(["generate", "--model", str(tiny_dir), "--preset", "mobile-6bit-no-t5", "--steps", "2",
                 "--guidance", "1", "a red circle", "--out", str(out)]) == 0
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)
    assert list((tmp_path / "cache" / "deploy" / "sensitivity").glob("*-int6-weight-0.03.json"))  # scan cached
    js = tmp_path / "e.json"
    assert main(["eval", "--model", str(tiny_dir), "--preset", "laptop-8bit-no-t5", "--steps", "2", "--guidance",
                 "1", "--split", "test", "--num-images", "3", "--no-fd", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["preset"]["name"] == "laptop-8bit-no-t5" and res["use_t5"] is False and res["num_images"] == 3
