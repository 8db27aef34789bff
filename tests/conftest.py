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
    from sd35flash.toy_teacher import load_pretrain_config
    from sd35flash.pretrain.run import pretrain

    out = tmp_path_factory.mktemp("teacher") / "smoke"
    return pretrain(load_pretrain_config("smoke"), out, "smoke", resume=False, progress=False)


@pytest.fixture(scope="session")
def smoke_study(smoke_teacher, tmp_path_factory) -> Path:
    """A tiny finished study: the smoke teacher at 2, 4 and 8 steps as three "models" (fast2, mid4,
    slow8), 5 shapes-world prompts x 2 seeds (30 model pairs, up to 5 gold pairs). Copy it before
    serving: votes go into the folder."""
    from sd35flash.study.create import ModelArg, create_study

    out = tmp_path_factory.mktemp("study") / "smoke"
    models = [ModelArg("fast2", str(smoke_teacher), 2), ModelArg("mid4", str(smoke_teacher), 4),
              ModelArg("slow8", str(smoke_teacher), 8)]
    create_study(models, "shapes", out, seeds=2, num_prompts=5, progress=False)
    return out
