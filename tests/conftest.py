"""Shared fixtures: an isolated cache, tiny pipelines, and a smoke teacher trained once per session."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sd35flash-cache")
    os.environ["SD35FLASH_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def smoke_teacher(cache_dir, tmp_path_factory) -> Path:
    """The smoke-preset teacher (VAE + flow), trained once per test session through the real CLI path."""
    from sd35flash.pretrain.config import load_pretrain_config
    from sd35flash.pretrain.run import pretrain

    out = tmp_path_factory.mktemp("teacher") / "smoke"
    return pretrain(load_pretrain_config("smoke"), out, "smoke", resume=False, progress=False)
