"""Pretraining: exact resume, caching, and the smoke teacher's folder."""

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from sd35flash.config import merge
from sd35flash.errors import StopTraining, UserError
from sd35flash.pretrain.run import pretrain
from sd35flash.toy_teacher import load_pretrain_config, teacher_dir


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


def test_checkpoint_layout_is_unchanged(cache_dir, tmp_path, monkeypatch):
    """A teacher run in progress resumes across code versions: its flow checkpoint holds exactly the
    files and keys earlier versions wrote (recorded from them for this config)."""
    from safetensors.torch import load_file

    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path / "c"))
    cfg = _tiny_cfg()
    with pytest.raises(StopTraining):
        pretrain(cfg, tmp_path / "s", "t", progress=False, stop_at=2)
    ckpt = teacher_dir(cfg, "t") / "work" / "flow" / "ckpt-00000002"
    # manifest.json (checksums) is new; older checkpoints without it still load (tests/test_integrity.py)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "manifest.json", "meta.json", "model.safetensors",
        "optimizer.bin", "random_states_0.pkl", "scheduler.bin"]
    model = load_file(str(ckpt / "model.safetensors"))
    assert len(model) == 129 and {k.split(".")[0] for k in model} == {
        "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}
    opt = torch.load(ckpt / "optimizer.bin", weights_only=False)
    assert sorted(opt) == ["param_groups", "state"] and len(opt["param_groups"]) == 2
    sched = torch.load(ckpt / "scheduler.bin", weights_only=False)
    assert {"last_epoch", "base_lrs", "_step_count"} <= set(sched) and sched["last_epoch"] == 2
    ema = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False)  # the EMA, then the sampler
    assert sorted(ema) == ["decay", "inv_gamma", "min_decay", "optimization_step", "power", "shadow_params",
                           "update_after_step", "use_ema_warmup"] and ema["optimization_step"] == 2
    sampler = torch.load(ckpt / "custom_checkpoint_1.pkl", weights_only=False)
    assert sorted(sampler) == ["epoch", "n", "pos", "seed"] and sampler["pos"] == 2 * cfg.flow.batch_size % 32


def test_init_continues_from_a_teacher(cache_dir, tmp_path, monkeypatch):
    """``init`` starts the flow stage from another teacher's weights and keeps its VAE: with a zero
    learning rate (1e-20: the config needs one > 0) the continued teacher is that teacher."""
    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path / "d"))
    first = pretrain(_tiny_cfg(), tmp_path / "first", "t", progress=False)
    cfg = merge(_tiny_cfg(lr=1e-20, text_encoder_lr=1e-20, steps=2), {"init": str(first)})
    assert cfg.cache_key() != _tiny_cfg(lr=1e-20, text_encoder_lr=1e-20, steps=2).cache_key()
    cont = pretrain(cfg, tmp_path / "cont", "t2", progress=False)
    a, b = _weights(first), _weights(cont)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-12), k
    va = StableDiffusion3Pipeline.from_pretrained(first).vae.state_dict()
    vb = StableDiffusion3Pipeline.from_pretrained(cont).vae.state_dict()
    assert all(torch.equal(va[k], vb[k]) for k in va)
    work = teacher_dir(cfg, "t2") / "work"
    assert json.loads((work / "vae" / "metrics.json").read_text())["init"] == str(first)
    assert not any((work / "vae").glob("ckpt-*"))  # no VAE stage ran
    # a fresh flow stage (nonzero rate) moves away from the init
    moved = pretrain(merge(_tiny_cfg(steps=2), {"init": str(first)}), tmp_path / "moved", "t3", progress=False)
    assert any(not torch.equal(a[k], v) for k, v in _weights(moved).items())


def test_init_must_match_the_model(cache_dir, tmp_path, monkeypatch):
    from sd35flash.errors import ConfigError

    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path / "e"))
    first = pretrain(_tiny_cfg(), tmp_path / "first", "t", progress=False)
    cfg = _tiny_cfg()
    cfg = merge(cfg, {"init": str(first), "model": {"num_layers": cfg.model.num_layers + 1}})
    with pytest.raises(ConfigError, match="transformer of .* does not match this config's model section"):
        pretrain(cfg, tmp_path / "bad", "t2", progress=False)
    with pytest.raises(UserError, match="neither an existing folder nor a shipped model"):
        pretrain(merge(_tiny_cfg(), {"init": "no-such-teacher"}), tmp_path / "bad2", "t3", progress=False)


def test_decoder_stage_tunes_only_the_decoder(cache_dir, tmp_path, monkeypatch):
    """The decoder stage leaves the encoder (so the latents) as they were, records PSNR and FD before
    and after, and ships the fine-tuned decoder only when its reconstruction FD is lower."""
    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path / "f"))
    cfg = merge(_tiny_cfg(), {"decoder": {"steps": 3, "num_images": 32, "eval_images": 24, "batch_size": 4}})
    assert cfg.cache_key() != _tiny_cfg().cache_key()
    out = pretrain(cfg, tmp_path / "dec", "t", progress=False)
    work = teacher_dir(cfg, "t") / "work"
    stage_a = StableDiffusion3Pipeline.from_pretrained(out).vae.state_dict()
    from diffusers import AutoencoderKL

    original = AutoencoderKL.from_pretrained(work / "vae" / "final").state_dict()
    m = json.loads((work / "decoder" / "metrics.json").read_text())
    assert {"psnr", "fd_reconstructions", "fd_floor"} <= m["before"].keys() == m["after"].keys()
    enc = [k for k in original if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in original if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and dec and all(torch.equal(original[k], stage_a[k]) for k in enc)
    changed = any(not torch.equal(original[k], stage_a[k]) for k in dec)
    assert changed == m["kept"] == (m["after"]["fd_reconstructions"] < m["before"]["fd_reconstructions"])
    info = json.loads((out / "pretrain.json").read_text())
    assert info["vae"]["decoder"]["kept"] == m["kept"]


def test_init_from_a_preset_reuses_its_cached_teacher(smoke_teacher, capsys):
    """``init: preset:NAME`` continues that preset's finished teacher from the cache (the chain of
    stages from scratch), without training it again."""
    cfg = merge(load_pretrain_config("smoke"), {"init": "preset:smoke", "flow": {"steps": 2, "probe_every": 0,
                                                                                "sample_every": 100}})
    out = pretrain(cfg, smoke_teacher.parent / "stage2", "smoke-2", progress=False)
    assert "reusing the cached teacher" in capsys.readouterr().out
    vb = StableDiffusion3Pipeline.from_pretrained(out).vae.state_dict()
    va = StableDiffusion3Pipeline.from_pretrained(smoke_teacher).vae.state_dict()
    assert all(torch.equal(va[k], vb[k]) for k in va)
