"""Strict typed configs: unknown keys and wrong types are named errors."""

import pytest

from sd35flash.config import from_dict, load_config, merge
from sd35flash.errors import ConfigError
from sd35flash.toy_teacher import PRESETS, PretrainConfig, load_pretrain_config


def test_presets_load():
    for name in PRESETS:
        cfg = load_pretrain_config(name)
        assert isinstance(cfg, PretrainConfig)
    assert load_pretrain_config("smoke").cache_key() != load_pretrain_config("quick").cache_key()


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("flow:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.flow\.lrr.*did you mean 'lr'"):
        load_config(PretrainConfig, p)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"config\.flow\.steps: expected an integer"):
        from_dict(PretrainConfig, {"flow": {"steps": "many"}})
    with pytest.raises(ConfigError, match="must be one of"):
        from_dict(PretrainConfig, {"runtime": {"mixed_precision": "fp8"}})


def test_merge_and_bad_yaml(tmp_path):
    cfg = merge(PretrainConfig(), {"flow": {"steps": 7}})
    assert cfg.flow.steps == 7 and cfg.vae.steps == PretrainConfig().vae.steps
    with pytest.raises(ConfigError, match="unknown config key"):
        merge(PretrainConfig(), {"nope": 1})
    p = tmp_path / "broken.yaml"
    p.write_text("flow: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PretrainConfig, p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_pretrain_config("huge")
