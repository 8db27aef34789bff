"""Shared fixtures: an isolated cache, the one tiny pipeline config, and a smoke teacher trained once
per session.

``tiny_config`` / ``tiny_words`` are the tiny untrained pipeline every test module builds on;
``tiny_pipeline(**changes)`` builds it (``changes`` replace config fields, ``words`` the vocabulary),
and ``tiny_dir`` is it saved once per session (read it, never write into it)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def cli_in_process() -> Callable[..., tuple[int, str, str]]:
    """``cli_in_process(*argv)``: ``sd35flash argv`` run by ``main`` in this process (no interpreter start),
    returning ``(exit code, stdout, stderr)``; argparse's exit becomes the code."""
    import sd35flash.models.pipeline_io  # noqa: F401  (imports diffusers / transformers once, outside the capture)
    from sd35flash.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        return code, out.getvalue(), err.getvalue()

    return run


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sd35flash-cache")
    os.environ["SD35FLASH_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def smoke_teacher(cache_dir, tmp_path_factory) -> Path:
    """The smoke-preset teacher (VAE + flow), trained once per test session through the real CLI path."""
    from sd35flash.pretrain.run import pretrain
    from sd35flash.toy_teacher import load_pretrain_config

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


@pytest.fixture(scope="session")
def tiny_config():
    """The tiny untrained pipeline's config: 32 px, 2 transformer layers, 12 text tokens."""
    from sd35flash.models import ToyConfig

    return ToyConfig(image_size=32, latent_channels=4, vae_block_out_channels=(8, 16, 16), num_layers=2,
                     num_attention_heads=2, attention_head_dim=16, clip_hidden=16, clip_layers=1, clip_heads=2,
                     t5_d_model=32, t5_layers=1, t5_heads=2, text_max_length=12)


@pytest.fixture(scope="session")
def tiny_words() -> list[str]:
    """The tiny pipeline's tokenizer vocabulary."""
    return "a an the small large red green blue yellow circle square triangle left right of and one two three".split()


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_config, tiny_words) -> Callable:
    """``tiny_pipeline(words=None, **changes)``: a fresh tiny pipeline (the same seeded weights every call
    for the same arguments), with ``changes`` applied to :func:`tiny_config`."""
    from sd35flash.models import build_toy_pipeline

    def build(words: list[str] | None = None, **changes):
        return build_toy_pipeline(dataclasses.replace(tiny_config, **changes), words or tiny_words)

    return build


@pytest.fixture(scope="session")
def tiny_dir(tiny_pipeline, tmp_path_factory) -> Path:
    """The tiny pipeline saved as a model folder, once per session."""
    from sd35flash.models import save_pipeline

    out = tmp_path_factory.mktemp("tiny") / "teacher"
    save_pipeline(tiny_pipeline(), out)
    return out
