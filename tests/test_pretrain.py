"""Pretraining: exact resume, caching, and the smoke teacher's folder."""

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from sd35flash.config import merge
from sd35flash.errors import UserError
from sd35flash.pretrain.config import load_pretrain_config
from sd35flash.pretrain.run import pretrain, teacher_dir
from sd35flash.train.checkpoint import StopTraining


def _tiny_cfg(**flow):
    cfg = load_pretrain_config("smoke")
    return merge(cfg, {"vae": {"steps": 4, "num_images": 32, "eval_images": 10},
                       "flow": {"steps": 8, "num_images": 32, "checkpoint_every": 100, "sample_every": 100,
                                "probe_every": 0, **flow}})


def _weights(folder):
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    sd = {f"transformer.{k}": v for k, v in pipe.transformer.state_dict().items()}
    sd.update({f"te3.{k}": v for k, v in pipe.text_encoder_3.state_dict().items()})
    return sd


def test_resume_equals_uninterrupted(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path / "a"))
    straight = pretrain(_tiny_cfg(), tmp_path / "straight", "t", progress=False)
    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path / "b"))
    with pytest.raises(StopTraining):
        pretrain(_tiny_cfg(), tmp_path / "resumed", "t", progress=False, stop_at=4)
    with pytest.raises(UserError, match="--resume"):  # never silently restarts
        pretrain(_tiny_cfg(), tmp_path / "resumed", "t", progress=False)
    resumed = pretrain(_tiny_cfg(), tmp_path / "resumed", "t", progress=False, resume=True)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_cached_teacher_is_reused(cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path / "c"))
    cfg = _tiny_cfg()
    first = pretrain(cfg, tmp_path / "one", "t", progress=False)
    stamp = (teacher_dir(cfg, "t") / "pipeline" / "pretrain.json").stat().st_mtime
    second = pretrain(cfg, tmp_path / "two", "t", progress=False)
    assert "reusing the cached teacher" in capsys.readouterr().out
    assert (teacher_dir(cfg, "t") / "pipeline" / "pretrain.json").stat().st_mtime == stamp
    assert json.loads((second / "pretrain.json").read_text())["fingerprint"] == cfg.cache_key()
    assert first != second and (second / "model_index.json").is_file()
